#!/usr/bin/env python3
"""The one short table at the end of scripts/gpu-check.sh, from the logs it wrote.

    python3 bench/gpu_summary.py OUT_DIR

Reads OUT_DIR/*.status, parity.log (with its "tune" lines), wide.log, profile.log (ncu CSV), golden-*.json, vitest.log, fuzz.log, oom.log,
memcheck.log, racecheck.log, torch.json and gpu-bench.json; every file may be missing (its
stage failed or was skipped).
"""
import glob
import json
import os
import re
import sys


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def load_json(path):
    text = read(path)
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        # The log may carry lines before the JSON object.
        i = text.find("{")
        try:
            return json.loads(text[i:]) if i >= 0 else None
        except ValueError:
            return None


def status(out, name):
    s = read(os.path.join(out, name + ".status"))
    return s.strip() if s else "not run"


def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def failing_cases(log):
    """The harness's FAIL lines (cuda_parity.cc Record: "FAIL <name padded to 52> <detail>"), by name."""
    fails = [l[5:57].rstrip() for l in log.splitlines() if l.startswith("FAIL ")]
    return ("failing: " + ", ".join(fails[:4]) + (" ..." if len(fails) > 4 else "")) if fails else ""


def parity_detail(out):
    log = read(os.path.join(out, "parity.log"))
    if not log:
        return ""
    rels = [float(m) for m in re.findall(r"rel=([0-9.eE+\-naif]+)", log) if re.match(r"^[0-9.eE+\-]+$", m)]
    summary = re.findall(r"summary: (\d+) cases, (\d+) failed", log)
    parts = []
    if summary:
        parts.append("%s cases, %s failed" % summary[-1])
    if rels:
        parts.append("max rel err %.2g" % max(rels))
    fails = failing_cases(log)
    if fails:
        parts.append(fails)
    if "SKIP:" in log:
        parts.append(log[log.index("SKIP:"):].splitlines()[0])
    copy = re.search(r"bench copy\s+([0-9.]+) GB/s", log)
    if copy:
        parts.append("harness D2D copy %s GB/s" % copy.group(1))
    return "; ".join(parts)


def tune_detail(out):
    """The parity log's "tune" lines (NOTE: [plan tuning]): the fastest setting of each sweep
    against the defaults (launch_plan.h's PlanTuning)."""
    log = read(os.path.join(out, "parity.log")) or ""
    pattern = r"^tune (.+?)\s+([HSB]) calls .* sum\s+([0-9.]+) us,\s+([0-9.]+)% of copy"
    sweeps = {}
    for m in re.finditer(pattern, log, re.M):
        sweeps.setdefault(m.group(2), []).append((m.group(1), float(m.group(3)), float(m.group(4))))
    parts = []
    defaults = (("S", "plane quads=1 min_per_thread=16 max_blocks=4096"), ("H", "conv quads=0 threads=2^18"),
                ("B", "batch job_max_blocks=all"))
    for kind, default in defaults:
        lines = sweeps.get(kind)
        if not lines:
            continue
        best = min(lines, key=lambda l: l[1])
        base = next((l for l in lines if l[0] == default), None)
        text = "%s best %s %.1f us (%.0f%%)" % (kind, best[0], best[1], best[2])
        if base:
            text += " vs default %.1f us (%.0f%%)" % (base[1], base[2])
        parts.append(text)
    return "; ".join(parts)


def wide_detail(out):
    log = read(os.path.join(out, "wide.log")) or ""
    line = next((l for l in log.splitlines() if "step/wide" in l), "")
    return re.sub(r"\s+", " ", line).strip()


# ncu's units (times to microseconds, sizes to bytes); ncu 2025+ prints "ns" and "byte".
UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6,
         "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def profile_kernels(out):
    """ncu's CSV rows (profile.log) -> [(kernel, launches, mean us, mean MB moved)], in first-seen order."""
    import csv
    log = read(os.path.join(out, "profile.log")) or ""
    rows = [l for l in log.splitlines() if l.startswith('"')]
    if not rows:
        return []
    reader = csv.DictReader(rows)
    launches = {}
    for r in reader:
        try:
            name = r["Kernel Name"].replace("(anonymous namespace)::", "").replace("void ", "")
            name = name.split("(")[0].split("<")[0].split("::")[-1].strip()
            key = (r["ID"], name)
            value = float(r["Metric Value"].replace(",", "")) * UNITS.get(r.get("Metric Unit", ""), 1.0)
        except (KeyError, ValueError):
            continue
        entry = launches.setdefault(key, {"us": 0.0, "bytes": 0.0, "occupancy": None, "registers": None})
        metric = r["Metric Name"]
        if metric.startswith("gpu__time_duration"):
            entry["us"] += value
        elif metric.startswith("dram__bytes"):
            entry["bytes"] += value
        elif metric.startswith("sm__warps_active"):
            entry["occupancy"] = value
        elif metric == "launch__registers_per_thread":
            entry["registers"] = value
    kernels = {}
    for (_, name), e in launches.items():
        k = kernels.setdefault(name, [0, 0.0, 0.0, [], []])
        k[0] += 1
        k[1] += e["us"]
        k[2] += e["bytes"]
        if e["occupancy"] is not None:
            k[3].append(e["occupancy"])
        if e["registers"] is not None:
            k[4].append(e["registers"])
    return [(n, c, us / c, b / c / 1e6, sum(occ) / len(occ) if occ else None, max(regs) if regs else None)
            for n, (c, us, b, occ, regs) in kernels.items()]


def profile_detail(out):
    kernels = profile_kernels(out)
    if not kernels:
        return ""
    total_us = sum(k[1] * k[2] for k in kernels) / 3  # three passes of the six calls
    total_mb = sum(k[1] * k[3] for k in kernels) / 3
    lines = ["kernels of cnn512's six conv factor calls (ncu; per launch):"]
    for n, c, us, mb, occupancy, registers in kernels:
        line = "  %-28s %3d launches  %8.2f us  %8.2f MB  %6.0f GB/s" % (n, c, us, mb, mb / us * 1e3 if us else 0)
        if occupancy is not None:
            line += "  occupancy %3.0f%%" % occupancy
        if registers is not None:
            line += "  %3.0f registers" % registers
        lines.append(line)
    lines.append("  GPU time per pass %.1f us for %.0f MB of DRAM traffic" % (total_us, total_mb))
    with open(os.path.join(out, "profile-kernels.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "GPU time per cnn512 conv-factor pass %.1f us (kernels only), %d launches; per kernel: profile-kernels.txt" % (
        total_us, sum(k[1] for k in kernels) // 3)


def golden_detail(out):
    parts = []
    for path in sorted(glob.glob(os.path.join(out, "golden-*.json"))):
        name = os.path.basename(path)[len("golden-"):-len(".json")]
        rep = load_json(path)
        if isinstance(rep, dict) and "overall" in rep:
            # JSON has no Infinity: a replay that diverged (or met a NaN) has overall null.
            overall = rep["overall"]
            error = "%.1e" % overall if isinstance(overall, (int, float)) else "inf"
            why = (" (%s)" % rep["divergence"]) if rep.get("divergence") else ""
            parts.append("%s %s%s%s" % (name, error, "" if rep.get("pass") else " FAIL", why))
        else:
            text = read(path) or ""
            err = [l.strip() for l in text.splitlines() if re.match(r"^\s*\w*Error\b", l)][:1]
            parts.append("%s: %s" % (name, err[0][:70] if err else "no report"))
    return ", ".join(parts)


def vitest_detail(out):
    log = read(os.path.join(out, "vitest.log"))
    if not log:
        return ""
    log = re.sub(r"\x1b\[[0-9;]*m", "", log)
    lines = [l.strip() for l in log.splitlines() if re.match(r"^\s*(Test Files|Tests)\s", l)]
    return "; ".join(lines[-2:])


def fuzz_detail(out):
    rep = load_json(os.path.join(out, "fuzz.log"))
    if not isinstance(rep, dict) or "calls" not in rep:
        return ""
    live = rep.get("liveAllocations") or {}
    return "%s calls on %s, %d findings, live allocations %s -> %s" % (
        rep["calls"], rep.get("backend", "?"), len(rep.get("findings") or []), live.get("start"), live.get("end"))


def oom_detail(out):
    log = read(os.path.join(out, "oom.log")) or ""
    line = next((l for l in reversed(log.splitlines()) if l.startswith("{")), None)
    rep = load_json_text(line)
    if not isinstance(rep, dict) or "checks" not in rep:
        return ""
    bad = [c["name"] for c in rep["checks"] if not c.get("ok")]
    first = rep["checks"][0].get("detail", "")[:90] if rep["checks"] else ""
    return "%d/%d checks ok%s; %s" % (len(rep["checks"]) - len(bad), len(rep["checks"]),
                                      (" (failed: " + "; ".join(bad)[:80] + ")") if bad else "", first)


def load_json_text(text):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def sanitizer_detail(out, tool):
    log = read(os.path.join(out, tool + ".log"))
    if not log:
        return ""
    m = re.findall(r"ERROR SUMMARY: (\d+) error", log)
    r = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", log)
    parts = []
    if m:
        parts.append("%s errors" % m[-1])
    if r:
        parts.append("%s hazards (%s errors, %s warnings)" % r[-1])
    if not parts:
        parts.append("no sanitizer summary (timed out or did not start?)")
    harness = re.findall(r"summary: (\d+) cases, (\d+) failed", log)
    if harness:
        parts.append("harness %s cases, %s failed" % harness[-1])
    fails = failing_cases(log)
    if fails:
        parts.append(fails)
    return "; ".join(parts)


def torch_detail(out):
    torch = load_json(os.path.join(out, "torch.json"))
    if not isinstance(torch, dict):
        return ""
    parts = ["torch %s" % torch.get("torch", "?")]
    golden = torch.get("golden") or {}
    if golden:
        errs = [g.get("maxRelError") for g in golden.values()]
        errs = [float("nan") if e is None else e for e in errs]  # null: NaN or infinite
        if all(e <= 1e-4 for e in errs):
            parts.append("eager AdaFisher reproduces %d golden files to %.1e" % (len(errs), max(errs)))
        else:
            parts.append("eager AdaFisher does NOT reproduce the golden files within 1e-4 (%s)" % ", ".join("%.1e" % e for e in errs))
    if torch.get("error"):
        parts.append("error: %s" % torch["error"][:60])
    return "; ".join(parts)


def bench_rows(out):
    bench = load_json(os.path.join(out, "gpu-bench.json"))
    torch = load_json(os.path.join(out, "torch.json"))
    rows = []
    copy = (bench or {}).get("copyGBps") or (torch or {}).get("copyGBps")
    head = "D2D copy %s GB/s" % fmt(copy, ".0f")
    if torch and torch.get("error"):
        head += "; torch error: %s" % torch["error"][:60]
    if (bench or {}).get("partial"):
        head += "; cut short: only the cases below finished" if (bench.get("key") or {}) else "; cut short before any case finished"
    rows.append(("bench", status(out, "bench"), head))
    for name, k in ((bench or {}).get("key") or {}).items():
        if "error" in k:
            rows.append(("bench " + name, "FAIL", k["error"][:100]))
            continue
        parts = [
            "step %s ms (off) / %s ms (on)" % (fmt(k.get("stepGuardOffMs")), fmt(k.get("stepGuardOnMs"))),
        ]
        if k.get("stepGuardOffFractionOfCopy") is not None:
            on24, on20 = k.get("stepGuardOnFractionOfCopy24"), k.get("stepGuardOnFractionOfCopy20")
            guard = (" (%.0f%% guard on, 24 B/p)" % (100 * on24) if on24 is not None
                     else " (%.0f%% guard on, 20 B/p)" % (100 * on20) if on20 is not None else "")
            parts.append("%.0f%% of copy" % (100 * k["stepGuardOffFractionOfCopy"]) + guard)
        if k.get("speedupVsFusedAdamGuardOff") is not None:
            on = k.get("speedupVsFusedAdamGuardOn")
            parts.append("%.2fx fused Adam" % k["speedupVsFusedAdamGuardOff"]
                         + (" (%.2fx guard on)" % on if on is not None else ""))
        if k.get("convFactorsFractionOfCopy") is not None:
            parts.append("conv factors %.0f%% of copy" % (100 * k["convFactorsFractionOfCopy"]))
        if k.get("convFactorsBatchedFractionOfCopy") is not None:
            parts.append("%.0f%% batched" % (100 * k["convFactorsBatchedFractionOfCopy"]))
        if k.get("wholeSpeedupVsEager") is not None:
            parts.append("whole %.1fx eager" % k["wholeSpeedupVsEager"])
        if k.get("wholeBatchedSpeedupVsEager") is not None:
            parts.append("%.1fx with recordFactors" % k["wholeBatchedSpeedupVsEager"])
        if k.get("factorsMs") is not None and k.get("factorsBatchedMs") is not None:
            parts.append("factors %s ms, %s ms batched" % (fmt(k["factorsMs"]), fmt(k["factorsBatchedMs"])))
        if k.get("hostArrayStepMs") is not None:
            parts.append("Float32Array step %s ms" % fmt(k["hostArrayStepMs"]))
        targets = ("stepCopyTargetMet", "stepCopyTargetMetGuardOn", "fusedAdamTargetMet", "fusedAdamTargetMetGuardOn",
                   "convFactorsTargetMet", "eagerTargetMet")
        verdicts = [(t, k[t]) for t in targets if t in k]
        # A target's verdict is true, false, or null when it was not measured.
        label = lambda t: t.replace("TargetMetGuardOn", "(guard on)").replace("TargetMet", "")  # noqa: E731
        missed = [label(t) for t, ok in verdicts if ok is False]
        unmeasured = [label(t) for t, ok in verdicts if ok is None]
        if missed:
            verdict = "MISSED: " + ",".join(missed)
        elif unmeasured:
            verdict = "not measured: " + ",".join(unmeasured)
        else:
            verdict = "targets met" if verdicts else "-"
        rows.append(("bench " + name, verdict, "; ".join(parts)))
    return rows


def safely(fn, *args):
    """A detail that cannot be read (a log of an unexpected form) says so; the table still prints."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any parse failure of one row
        return "unreadable (%s: %s)" % (type(e).__name__, e)


def main(out):
    smi = (read(os.path.join(out, "nvidia-smi.txt")) or "no nvidia-smi output").strip().splitlines()
    tune = safely(tune_detail, out)
    rows = [
        ("build", status(out, "build"), ""),
        ("parity", status(out, "parity"), safely(parity_detail, out)),
        ("wide", status(out, "wide"), safely(wide_detail, out)),
        ("golden", status(out, "golden"), safely(golden_detail, out)),
        ("vitest", status(out, "vitest"), safely(vitest_detail, out)),
        ("fuzz", status(out, "fuzz"), safely(fuzz_detail, out)),
        ("oom", status(out, "oom"), safely(oom_detail, out)),
        ("memcheck", status(out, "memcheck"), safely(sanitizer_detail, out, "memcheck")),
        ("racecheck", status(out, "racecheck"), safely(sanitizer_detail, out, "racecheck")),
        ("profile", status(out, "profile"), safely(profile_detail, out)),
        ("tune", "sweep" if tune else "not run", tune),
        ("torch", status(out, "torch"), safely(torch_detail, out)),
    ]
    try:
        rows += bench_rows(out)
    except Exception as e:  # noqa: BLE001
        rows.append(("bench", status(out, "bench"), "unreadable (%s: %s)" % (type(e).__name__, e)))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print("\nGPU check: %s" % (smi[0] if smi else "?"))
    print("| %s | %s | detail" % ("check".ljust(w0), "result".ljust(w1)))
    print("|-%s-|-%s-|-------" % ("-" * w0, "-" * w1))
    for name, result, detail in rows:
        print("| %s | %s | %s" % (name.ljust(w0), result.ljust(w1), detail.replace("|", "/")))  # one row, three columns


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/gpu-check")
