#!/usr/bin/env python3
"""PyTorch baselines for the benchmarks, on the same machine in the same run.

    node dist/bench/gpu.js --dump-cases > cases.json
    python3 bench/torch_baselines.py --cases cases.json --out torch.json                  # GPU
    python3 bench/torch_baselines.py --cases cases.json --device cpu --threads 2 --out t.json
    python3 bench/torch_baselines.py --check-golden test/golden/*.json [--device cpu]

Prints (and writes with --out) one JSON object:
    {"device", "torch", "threads", "copyGBps", "golden": {file: max rel. error},
     "workloads": {name: {"fusedAdamMs", "adam", "eager": {"factorsMs", "minMaxEmaMs",
                                                         "stepMs", "totalMs"}}}}
that `node dist/bench/gpu.js --torch torch.json` (and `node dist/bench/cpu.js`, which runs
this script itself when torch is importable) turn into ratios.

- copyGBps: y.copy_(x) of a large float32 buffer, counted as read + write.
- fusedAdamMs: torch.optim.Adam(fused=True).step() on the workload's parameter shapes
  ("adam" says which implementation ran: "fused", or "foreach" where fused is missing).
- eager: AdaFisher written from docs/ALGORITHM.md the way the official code does it: unfold +
  einsum factors (im2col materialized), min-max + EMA with separate ops, F materialized with
  torch.kron, then separate elementwise momentum / update ops per parameter.
- golden: before timing, the eager AdaFisher replays the golden trajectories (when
  --check-golden names them) and reports its max relative error against them, so the
  baseline is shown to compute AdaFisher, not something cheaper.
Timing: median over samples of (time around `inner` back-to-back calls) / inner; CUDA
events on the GPU, time.perf_counter on the CPU.
"""
import argparse
import json
import math
import statistics
import sys
import time
import traceback


def time_calls(torch, device, fn, reps, min_sample_ms=2.0, max_inner=200, warmup=3):
    """Median milliseconds per call of fn over `reps` samples of back-to-back calls."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def sample(inner):
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:

        def sample(inner):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            return (time.perf_counter() - t0) * 1e3

    one = max(sample(1), 1e-3)
    inner = int(max(1, min(max_inner, min_sample_ms / one)))
    return statistics.median(sample(inner) / inner for _ in range(reps))


def measure_copy(torch, device, reps):
    n = (256 if device == "cuda" else 64) * 1024 * 1024  # 1 GiB on the GPU, 256 MiB on the CPU
    x = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    ms = time_calls(torch, device, lambda: y.copy_(x), reps, min_sample_ms=20.0, max_inner=20)
    del x, y
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * n * 4 / (ms * 1e6)


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class Layer:
    """One layer as the eager optimizer sees it, from a bench case shape or a golden layer."""

    def __init__(self, d):
        self.kind = d["kind"]
        self.bias = bool(d.get("bias"))
        if self.kind == "linear":
            self.weight_shape = [d["out"], d["in"]]
            self.k, self.out = d["in"], d["out"]
        elif self.kind == "conv2d":
            self.kernel, self.stride, self.padding = pair(d["kernel"]), pair(d["stride"]), pair(d["padding"])
            self.groups = d.get("groups", 1)
            cg = d["inChannels"] // self.groups
            self.weight_shape = [d["outChannels"], cg, *self.kernel]
            self.k, self.out = cg * self.kernel[0] * self.kernel[1], d["outChannels"]
        elif self.kind in ("batchnorm2d", "layernorm"):
            c = d["channels"] if self.kind == "batchnorm2d" else d["shape"][-1]
            self.weight_shape = [c]
            self.k, self.out = 1, c  # a weight [C, 1] plus a bias: H has two entries
            self.bias = True
        else:
            raise ValueError(f"layer kind {self.kind!r} is not supported by the eager baseline")
        self.h_len = self.k + (1 if self.bias else 0)


class EagerAdaFisher:
    """AdaFisher the way the official PyTorch code computes it (eager, materialized)."""

    def __init__(self, torch, device, layers, lr=1e-4, beta=0.9, damping=1e-3, gamma=0.8, weight_decay=0.0,
                 decoupled=False):
        self.torch, self.layers = torch, layers
        self.lr, self.beta, self.damping, self.wd, self.decoupled = lr, beta, damping, weight_decay, decoupled
        self.decay, self.mix = gamma / 10, gamma / 100
        self.H = [torch.ones(l.h_len, device=device) for l in layers]
        self.S = [torch.ones(l.out, device=device) for l in layers]
        self.t = 0

    def factors(self, acts, gouts):
        torch = self.torch
        fresh = []
        for l, a, g in zip(self.layers, acts, gouts):
            if l.kind == "linear":
                a2 = a.reshape(-1, a.size(-1))
                g2 = g.reshape(-1, g.size(-1))
                rows = a2.size(0)
            elif l.kind == "conv2d":
                # im2col, as the official _extract_patches: [N*OH*OW (*groups), C/groups*kh*kw]
                p = torch.nn.functional.unfold(a, kernel_size=l.kernel, padding=l.padding, stride=l.stride)
                n, _, cols = p.shape
                a2 = p.view(n, l.groups, l.k, cols).permute(0, 1, 3, 2).reshape(-1, l.k)
                g2 = g.permute(0, 2, 3, 1).reshape(-1, g.size(1))
                rows = n * cols  # every group adds to the same entries; the ones column sums to groups
            else:  # batchnorm2d, layernorm: ALGORITHM.md's closed forms
                n = a.size(0)
                dims = [d for d in range(a.dim()) if d != 1]  # axis 1 (channels / kept axis) stays
                q = math.prod(a.size(d) for d in dims if d != 0)
                u = a.sum(dims) / (q * q)
                H = torch.stack([(u * u).sum(), u.new_tensor(float(a.size(1)))]) / (n * n)
                S = g.reshape(-1, g.size(-1)).sum(0) if l.kind == "layernorm" else g.sum((0, 2, 3))
                fresh.append((H, S * S / n))
                continue
            if l.bias:
                a2 = torch.cat([a2, a2.new_ones(a2.size(0), 1)], 1)
            H = torch.einsum("ij,ij->j", a2, a2) / rows
            S = torch.einsum("ij,ij->j", g2, g2) / g2.size(0)
            fresh.append((H, S))
        return fresh

    def min_max_ema(self, fresh):
        torch = self.torch
        for i, (H, S) in enumerate(fresh):
            for running, x in ((self.H[i], H), (self.S[i], S)):
                x = torch.where(x == float("inf"), torch.ones_like(x), x)
                x = torch.where(x == float("-inf"), torch.zeros_like(x), x)
                x = (x - x.min()) / (x.max() - x.min() + 1e-6)
                running.mul_(self.decay).add_(x, alpha=self.mix)

    def step(self, params, grads, momenta):
        torch = self.torch
        self.t += 1
        bc = 1 - self.beta ** self.t
        j = 0
        for i, l in enumerate(self.layers):
            F = torch.kron(self.S[i], self.H[i]).view(l.out, l.h_len) + self.damping
            parts = [F[:, : l.k].reshape(l.weight_shape)]
            if l.bias:
                parts.append(F[:, l.k])
            for f in parts:
                p, g, m = params[j], grads[j], momenta[j]
                j += 1
                if self.wd and not self.decoupled:
                    g = g.add(p, alpha=self.wd)
                m.mul_(self.beta).add_(g, alpha=1 - self.beta)
                if self.decoupled:
                    p.sub_(self.lr * (m / (bc * f) + self.wd * p))
                else:
                    p.add_(m / f, alpha=-self.lr / bc)


def check_golden(torch, device, path):
    """Replays one golden trajectory through EagerAdaFisher; returns (max rel. error, worst array)."""
    with open(path) as f:
        gold = json.load(f)
    cfg = gold["config"]
    layers = [Layer(d) for d in gold["layers"]]
    opt = EagerAdaFisher(torch, device, layers, lr=cfg["lr"], beta=cfg["beta"], damping=cfg["damping"],
                         gamma=cfg["gamma"], weight_decay=cfg["weightDecay"],
                         decoupled=cfg["optimizer"] == "AdaFisherW")

    def tensor(values, shape):
        return torch.tensor(values, dtype=torch.float32, device=device).reshape(shape)

    params = []
    for l, init in zip(layers, gold["init"]):
        params.append(tensor(init["weight"], l.weight_shape))
        if l.bias:
            params.append(tensor(init["bias"], [l.out]))
    momenta = [torch.zeros_like(p) for p in params]
    worst, where = 0.0, ""
    for k, st in enumerate(gold["steps"]):
        refresh = k % cfg["tcov"] == 0
        if refresh != st["factorsUpdated"]:
            raise RuntimeError(f"{path}: step {k} refresh cadence differs from the recording")
        if refresh:
            acts = [tensor(s["input"], s["inputShape"]) for s in st["seen"]]
            gouts = [tensor(s["gradOutput"], s["gradOutputShape"]) for s in st["seen"]]
            opt.min_max_ema(opt.factors(acts, gouts))
        grads = []
        for l, s in zip(layers, st["seen"]):
            grads.append(tensor(s["weightGrad"], l.weight_shape))
            if l.bias:
                grads.append(tensor(s["biasGrad"], [l.out]))
        opt.step(params, grads, momenta)
        j = 0
        for i, (l, after) in enumerate(zip(layers, st["after"])):
            got = {"weight": params[j], "momentumWeight": momenta[j], "H": opt.H[i], "S": opt.S[i]}
            j += 1
            if l.bias:
                got.update(bias=params[j], momentumBias=momenta[j])
                j += 1
            for name, t in got.items():
                want = torch.tensor(after[name], dtype=torch.float64)
                err = (t.double().cpu().flatten() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
                if err > worst or (err != err and worst == worst):  # a NaN is the worst, not skipped
                    worst, where = err, f"step {k} layer {i} {name}"
    return worst, where


def bench_workload(torch, device, wl, reps):
    shapes = wl["shapes"]
    layers = [Layer(s["def"]) for s in shapes]
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(shape, scale):
        return torch.randn(shape, device=device, generator=gen) * scale

    params, grads = [], []
    for s in shapes:
        params.append(randn(s["weightShape"], 0.05))
        grads.append(randn(s["weightShape"], 1e-2))
        if s["biasShape"]:
            params.append(randn(s["biasShape"], 0.05))
            grads.append(randn(s["biasShape"], 1e-2))
    acts = [randn(s["inputShape"], 1.0) for s in shapes]
    gouts = [randn(s["outputShape"], 1e-3) for s in shapes]
    out = {}

    # torch Adam on the same parameter shapes: fused, or foreach where this build has no fused kernel.
    adam_params = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(adam_params, grads):
        p.grad = g.clone()
    try:
        adam = torch.optim.Adam(adam_params, lr=1e-4, fused=True)
        adam.step()
        out["adam"] = "fused"
    except (RuntimeError, ValueError):
        adam = torch.optim.Adam(adam_params, lr=1e-4, foreach=True)
        out["adam"] = "foreach"
    out["fusedAdamMs"] = time_calls(torch, device, adam.step, reps)
    del adam, adam_params
    if device == "cuda":
        torch.cuda.empty_cache()

    # Eager AdaFisher, part by part and whole.
    eager = EagerAdaFisher(torch, device, layers)
    momenta = [torch.zeros_like(p) for p in params]
    fresh = eager.factors(acts, gouts)
    factors_ms = time_calls(torch, device, lambda: eager.factors(acts, gouts), reps)
    mm_ms = time_calls(torch, device, lambda: eager.min_max_ema(fresh), reps)
    step_ms = time_calls(torch, device, lambda: eager.step(params, grads, momenta), reps)

    def whole():
        eager.min_max_ema(eager.factors(acts, gouts))
        eager.step(params, grads, momenta)

    total_ms = time_calls(torch, device, whole, reps)
    out["eager"] = {"factorsMs": factors_ms, "minMaxEmaMs": mm_ms, "stepMs": step_ms, "totalMs": total_ms}
    return out


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", help="JSON from `node dist/bench/gpu.js --dump-cases`")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    ap.add_argument("--check-golden", nargs="*", default=[], metavar="FILE",
                    help="golden trajectories the eager AdaFisher must reproduce (max rel. error <= 1e-4)")
    args = ap.parse_args(argv)
    result = {}
    code = 0
    try:
        import torch

        device = args.device
        if device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("torch.cuda.is_available() is False")
            torch.backends.cuda.matmul.allow_tf32 = False
            result["device"] = torch.cuda.get_device_name(0)
        else:
            if args.threads:
                torch.set_num_threads(args.threads)
            result["device"] = "cpu"
        result["torch"] = torch.__version__
        result["threads"] = torch.get_num_threads()
        if args.check_golden:
            result["golden"] = {}
            for path in args.check_golden:
                err, where = check_golden(torch, device, path)
                # JSON has no NaN or Infinity (Node's JSON.parse refuses them): those go as null.
                result["golden"][path.rsplit("/", 1)[-1]] = {"maxRelError": err if math.isfinite(err) else None, "worst": where}
                if not err <= 1e-4:
                    print(f"eager AdaFisher does not reproduce {path}: {err:.3g} at {where}", file=sys.stderr)
                    code = 1
        if args.cases:
            with open(args.cases) as f:
                cases = json.load(f)
            result["copyGBps"] = measure_copy(torch, device, args.reps)
            result["workloads"] = {}
            for name, wl in cases.items():
                try:
                    result["workloads"][name] = bench_workload(torch, device, wl, args.reps)
                except Exception as e:  # keep the other workloads
                    traceback.print_exc()
                    result["workloads"][name] = {"error": repr(e)}
                    code = 1
                if device == "cuda":
                    torch.cuda.empty_cache()
    except Exception as e:
        traceback.print_exc()
        result["error"] = repr(e)
        code = 1
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
