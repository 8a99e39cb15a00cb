#!/usr/bin/env python3
"""PyTorch baselines for the GPU benchmark, on the same card in the same run.

    node dist/bench/gpu.js --dump-cases > cases.json
    python3 bench/torch_baselines.py --cases cases.json --out torch.json

Prints (and writes with --out) one JSON object:
    {"device", "torch", "copyGBps",
     "workloads": {name: {"fusedAdamMs", "eager": {"factorsMs", "minMaxEmaMs", "stepMs", "totalMs"}}}}
that `node dist/bench/gpu.js --torch torch.json` turns into ratios.

- copyGBps: device-to-device copy (y.copy_(x), 1 GiB), counted as read + write.
- fusedAdamMs: torch.optim.Adam(fused=True).step() on the workload's parameter shapes.
- eager: AdaFisher written from ALGORITHM.md the way the official code does it: unfold +
  einsum factors (im2col materialized), min-max + EMA with separate ops, F materialized with
  torch.kron, then separate elementwise momentum / update ops per parameter.
All timed with CUDA events: median over samples of (events around `inner` calls) / inner.
"""
import argparse
import json
import statistics
import sys
import traceback


def time_cuda(torch, fn, reps, min_sample_ms=2.0, max_inner=200, warmup=3):
    """Median milliseconds per call of fn, from CUDA events around batches of calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = max(start.elapsed_time(end), 1e-3)
    inner = int(max(1, min(max_inner, min_sample_ms / one)))
    samples = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def measure_copy(torch, reps):
    n = 256 * 1024 * 1024  # 1 GiB of float32
    x = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    y = torch.empty_like(x)
    ms = time_cuda(torch, lambda: y.copy_(x), reps, min_sample_ms=20.0, max_inner=20)
    del x, y
    torch.cuda.empty_cache()
    return 2 * n * 4 / (ms * 1e6)


class EagerAdaFisher:
    """AdaFisher the way the official PyTorch code computes it (eager, materialized)."""

    def __init__(self, torch, shapes, lr=1e-4, beta=0.9, damping=1e-3, gamma=0.8, weight_decay=0.0):
        self.torch = torch
        self.shapes = shapes
        self.lr, self.beta, self.damping, self.wd = lr, beta, damping, weight_decay
        self.decay, self.mix = gamma / 10, gamma / 100
        self.H, self.S = [], []
        for s in shapes:
            d = s["def"]
            k = d["in"] if d["kind"] == "linear" else d["inChannels"] * d["kernel"] * d["kernel"]
            self.H.append(torch.ones(k + (1 if d["bias"] else 0), device="cuda"))
            self.S.append(torch.ones(s["outputShape"][1], device="cuda"))
        self.t = 0

    def factors(self, acts, gouts):
        torch = self.torch
        fresh = []
        for s, a, g in zip(self.shapes, acts, gouts):
            d = s["def"]
            if d["kind"] == "linear":
                a2 = a.reshape(-1, a.size(-1))
                g2 = g.reshape(-1, g.size(-1))
            else:
                # im2col, as the official _extract_patches: [N*OH*OW, C*kh*kw]
                p = torch.nn.functional.unfold(a, kernel_size=d["kernel"], padding=d["padding"], stride=d["stride"])
                a2 = p.transpose(1, 2).reshape(-1, p.size(1))
                g2 = g.transpose(1, 2).transpose(2, 3).reshape(-1, g.size(1))
            if d["bias"]:
                a2 = torch.cat([a2, a2.new_ones(a2.size(0), 1)], 1)
            H = torch.einsum("ij,ij->j", a2, a2) / a2.size(0)
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
        for i, s in enumerate(self.shapes):
            d = s["def"]
            F = torch.kron(self.S[i], self.H[i]).view(self.S[i].numel(), self.H[i].numel()) + self.damping
            k = self.H[i].numel() - (1 if d["bias"] else 0)
            parts = [F[:, :k].reshape(s["weightShape"])]
            if d["bias"]:
                parts.append(F[:, k])
            for f in parts:
                p, g, m = params[j], grads[j], momenta[j]
                j += 1
                if self.wd:
                    g = g.add(p, alpha=self.wd)
                m.mul_(self.beta).add_(g, alpha=1 - self.beta)
                p.add_(m / f, alpha=-self.lr / bc)


def bench_workload(torch, wl, reps):
    shapes = wl["shapes"]
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(shape, scale):
        return torch.randn(shape, device="cuda", generator=gen) * scale

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

    # torch fused Adam on the same parameter shapes.
    adam_params = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(adam_params, grads):
        p.grad = g.clone()
    adam = torch.optim.Adam(adam_params, lr=1e-4, fused=True)
    out["fusedAdamMs"] = time_cuda(torch, adam.step, reps)
    del adam, adam_params
    torch.cuda.empty_cache()

    # Eager AdaFisher, part by part and whole.
    eager = EagerAdaFisher(torch, shapes)
    momenta = [torch.zeros_like(p) for p in params]
    fresh = eager.factors(acts, gouts)
    factors_ms = time_cuda(torch, lambda: eager.factors(acts, gouts), reps)
    mm_ms = time_cuda(torch, lambda: eager.min_max_ema(fresh), reps)
    step_ms = time_cuda(torch, lambda: eager.step(params, grads, momenta), reps)

    def whole():
        eager.min_max_ema(eager.factors(acts, gouts))
        eager.step(params, grads, momenta)

    total_ms = time_cuda(torch, whole, reps)
    out["eager"] = {"factorsMs": factors_ms, "minMaxEmaMs": mm_ms, "stepMs": step_ms, "totalMs": total_ms}
    return out


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True, help="JSON from `node dist/bench/gpu.js --dump-cases`")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    result = {}
    code = 0
    try:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False")
        torch.backends.cuda.matmul.allow_tf32 = False
        result["device"] = torch.cuda.get_device_name(0)
        result["torch"] = torch.__version__
        with open(args.cases) as f:
            cases = json.load(f)
        result["copyGBps"] = measure_copy(torch, args.reps)
        result["workloads"] = {}
        for name, wl in cases.items():
            try:
                result["workloads"][name] = bench_workload(torch, wl, args.reps)
            except Exception as e:  # keep the other workloads
                traceback.print_exc()
                result["workloads"][name] = {"error": repr(e)}
                code = 1
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
