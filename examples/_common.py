"""Shared by the example scripts: patch as asked, generate greedily, report what compression did."""
from __future__ import annotations

import time
from typing import Any

import torch

import vtc


def generate_and_report(model: Any, processor: Any, inputs: Any, args: Any) -> "vtc.Patch | None":
    """Patch per ``args.method/ratio/tokens`` (ratio 0.25 by default), generate, print answer and token counts."""
    p = None
    if args.method != "none":
        ratio = args.ratio if args.ratio is not None or args.tokens is not None else 0.25
        p = vtc.patch(model, args.method, ratio=ratio, tokens=args.tokens)
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
    return p
