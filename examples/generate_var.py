"""Class-conditional image generation with VAR, with or without KV-cache compression.

    python examples/generate_var.py --class 3 --seed 0 --out img.png                      # the bundled toy VAR
    python examples/generate_var.py --class 3 --method snapkv --ratio 0.3 --out img.png
    python examples/generate_var.py --vae vae_ch160v4096z32.pth --var var_d16.pth --depth 16 --class 207 --out dog.png

Prints the KV cache's peak size (and an uncompressed cache's), the generation time and, on the toy, which class the
judge classifier sees in the image.
"""
from __future__ import annotations

import argparse
import time

import torch
from PIL import Image

import vtc
from vtc.eval.runner import parse_method_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--class", dest="cls", type=int, default=0, help="class label (toy: 0-15; ImageNet: 0-999)")
    ap.add_argument("--n", type=int, default=1, help="images to generate (a row of the output image)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="var_sample.png")
    ap.add_argument("--vae", help="official vae_ch160v4096z32.pth (with --var); default: the bundled toy VAR")
    ap.add_argument("--var", help="official var_d{16,20,24,30}.pth")
    ap.add_argument("--depth", type=int, default=16, help="depth of the official checkpoint")
    ap.add_argument("--method", default="none", help="'none' or a KV-cache method for VAR (snapkv, streaming, "
                    "kv_random, hack), options as name:key=value+...")
    ap.add_argument("--ratio", type=float, default=None, help="fraction of the KV cache kept (default 0.5)")
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--top-k", type=int, default=900)
    ap.add_argument("--top-p", type=float, default=0.96)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    judge = None
    if args.vae or args.var:
        if not (args.vae and args.var):
            ap.error("--vae and --var go together")
        from vtc.models.var import from_pretrained

        dtype = torch.float16 if args.device == "cuda" else torch.float32
        vae, var = from_pretrained(args.vae, args.var, depth=args.depth, device=args.device, dtype=dtype)
        print(f"model: VAR-d{args.depth} ({args.var})")
    else:
        from vtc.zoo.models import TOY_VAR, load_judge, load_var

        vae, var = load_var(TOY_VAR, args.device)
        judge = load_judge(TOY_VAR, args.device)
        print(f"model: bundled toy VAR ({TOY_VAR.name}, 16 synthetic classes at 64 px)")

    p = None
    if args.method != "none":
        name, hyper = parse_method_spec(args.method)
        if name == "hack" and "calibration" not in hyper:
            from vtc.hack import with_calibration

            hyper = with_calibration(var, hyper, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
            print(f"hack: head calibration {hyper['calibration']}")
        p = vtc.patch(var, name, ratio=args.ratio if args.ratio is not None else 0.5, **hyper)
    t0 = time.perf_counter()
    imgs = var.generate([args.cls] * args.n, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    dt = time.perf_counter() - t0
    cache = var.last_cache
    row = (imgs.clamp(0, 1).permute(0, 2, 3, 1).reshape(-1, imgs.shape[-1], 3) * 255).round().byte().cpu()
    Image.fromarray(row.permute(1, 0, 2).reshape(imgs.shape[-1], -1, 3).numpy()).save(args.out)
    print(f"images: {args.n} of class {args.cls} -> {args.out}")
    print(f"KV cache: peak {cache.peak_bytes / 2**20:.2f} MiB held, uncompressed {cache.dense_peak_bytes / 2**20:.2f} "
          f"MiB ({cache.peak_bytes / cache.dense_peak_bytes:.3f}); generate {dt:.2f} s"
          + (f"; {p.method.describe()}" if p else ""))
    if judge is not None:
        from vtc.eval.var_eval import judge as run_judge
        from vtc.zoo.var_shapes import class_name

        preds = run_judge(judge, imgs)[0].tolist()
        print(f"judge sees: {[class_name(c) for c in preds]} (asked: {class_name(args.cls)})")


if __name__ == "__main__":
    main()
