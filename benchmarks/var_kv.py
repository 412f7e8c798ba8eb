"""VAR KV-cache memory and generation time: uncompressed vs HACK and the eviction baselines, in one process.

    python benchmarks/var_kv.py                                  # toy VAR, then VAR-d16 shape (random weights)
    python benchmarks/var_kv.py --shapes d16,d30 --dtype bfloat16
    python benchmarks/var_kv.py --device cuda --shapes d16,d30 --dtype float16 --batch 8

Per shape: the uncompressed generation first, then each method at each ratio (same labels, same seed, CFG 2B
batch). Columns: peak KV bytes held (after any scale; every tensor of the cache) and its ratio to the uncompressed
row's, generation seconds (median of ``--repeats``; VQ-VAE decoding included, identical in every row) and the
speedup. HACK is calibrated first on ``--calibrate`` samples (the paper: one is enough for a stable split); random
weights make its split arbitrary but its memory and time real.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import vtc
from vtc.hack import calibrate
from vtc.models.var import build
from vtc.zoo.models import TOY_VAR, load_var


def model_for(shape: str, device: str, dtype: torch.dtype):
    if shape == "toy":
        return load_var(TOY_VAR, device, dtype)[1]
    depth = int(shape.lstrip("d"))
    torch.manual_seed(0)
    with torch.device(device):
        vae, var = build(depth)
    return var.to(device, dtype).eval()


def timed_generation(var, labels, repeats: int, device: str) -> tuple[float, int, int]:
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        var.generate(labels, cfg=1.5, top_k=900, top_p=0.96, seed=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    c = var.last_cache
    return statistics.median(times), c.peak_bytes, c.dense_peak_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="toy,d16", help="comma-separated: toy, d16, d20, d24, d30")
    ap.add_argument("--methods", default="hack,snapkv,streaming")
    ap.add_argument("--ratios", default="0.5,0.3")
    ap.add_argument("--batch", type=int, default=1, help="images per generation (2x rows with CFG)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--calibrate", type=int, default=1, help="HACK calibration samples")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    for shape in args.shapes.split(","):
        var = model_for(shape, args.device, dtype)
        labels = [i % var.num_classes for i in range(args.batch)]
        timed_generation(var, labels, 1, args.device) if args.device.startswith("cuda") else None  # warm-up
        base_t, base_b, dense = timed_generation(var, labels, args.repeats, args.device)
        dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU x{torch.get_num_threads()}"
        print(f"\n## {shape}: depth {var.depth}, width {var.C}, {var.num_heads} heads, L = {var.L}, batch {args.batch} "
              f"(+CFG), {args.dtype}, {dev}")
        print("| method | ratio | KV peak MiB | vs uncompressed | generate s | speedup |\n|---|---|---|---|---|---|")
        print(f"| uncompressed | 1 | {base_b / 2**20:.2f} | 1.000 | {base_t:.3f} | 1.00x |")
        cal = None
        for method in args.methods.split(","):
            for r in (float(x) for x in args.ratios.split(",")):
                hyper = {}
                if method == "hack":
                    cal = cal or calibrate(var, n=args.calibrate, batch=args.batch)
                    hyper["calibration"] = cal
                with vtc.patched(var, method, ratio=r, **hyper):
                    t, b, _ = timed_generation(var, labels, args.repeats, args.device)
                print(f"| {method} | {r:g} | {b / 2**20:.2f} | {b / base_b:.3f} | {t:.3f} | {base_t / t:.2f}x |")
        del var
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
