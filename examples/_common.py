"""Shared by the example scripts: patch as asked, generate greedily, report what compression did."""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch

import vtc


def add_compression_args(ap: argparse.ArgumentParser, ratio_help: str) -> None:
    """The flags both examples share: method, budget, generation length, device."""
    ap.add_argument("--method", default="cls", help=f"one of {vtc.available_methods()} or 'none', with options as "
                    "name:key=value+key=value (e.g. zipvl:tau=0.95+kv=evict)")
    ap.add_argument("--ratio", type=float, default=None, help=ratio_help)
    ap.add_argument("--tokens", type=int, default=None,
                    help="visual tokens kept per image / video (instead of --ratio)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_for_example(args: argparse.Namespace, default: Callable[[str], tuple], cuda_dtype: torch.dtype) -> tuple:
    """``--model`` if given (in ``cuda_dtype`` on a GPU), else the bundled default; prints which."""
    from vtc.zoo.models import load_model

    if args.model:
        model, processor = load_model(args.model, args.device, cuda_dtype if args.device == "cuda" else None)
        label = args.model
    else:
        model, processor, label = default(args.device)
    print(f"model: {label}")
    return model, processor


def generate_and_report(model: Any, processor: Any, inputs: Any, args: Any) -> "vtc.Patch | None":
    """Patch per ``args.method/ratio/tokens`` (ratio 0.25 by default), generate, print answer and token counts."""
    from vtc.eval.runner import own_budget, parse_method_spec

    p = None
    if args.method != "none":
        name, hyper = parse_method_spec(args.method)
        ratio = args.ratio if args.ratio is not None or args.tokens is not None or own_budget(name) else 0.25
        p = vtc.patch(model, name, ratio=ratio, tokens=args.tokens, **hyper)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    dt = time.perf_counter() - t0
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    print(f"question: {args.question}")
    print(f"answer: {answer}")
    if p is None:
        print(f"visual tokens: uncompressed; generate {dt:.2f} s")
        return None
    st = p.stats[0]
    print(f"visual tokens: {st.tokens_before[0]} -> {st.tokens_after[0]} kept ({p.method.describe()}); "
          f"compression overhead {st.seconds * 1e3:.1f} ms; generate {dt:.2f} s")
    if st.important_fraction() is not None:
        kv = f"; KV cache {st.kv_bits:.2f} bits per value" if st.kv_bits is not None else ""
        print(f"important tokens per layer: {st.important_fraction():.1%} of {st.sequence_tokens[0]}{kv}")
    return p
