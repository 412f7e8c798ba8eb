"""The toy TokenPacker (49 packed tokens) against training-free pruning of the toy LLaVA to the same 49 tokens
(ratio 0.25) and the uncompressed toy LLaVA (196): MME perception, accuracy per category, and prefill time, all
measured in one process on the ShapesMME test split.

    python benchmarks/tokenpacker_toy.py                 # needs the bundled toy-llava and toy-tokenpacker
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import vtc
from vtc.cli import TEST_SEED, _cached_split
from vtc.eval.mme_data import load_mme, write_shapes_mme
from vtc.eval.mme_scoring import mme_prompt
from vtc.eval.runner import evaluate_mme
from vtc.zoo.models import load_model


def prefill_ms(model, proc, recs, batch: int, repeats: int) -> float:
    """Median milliseconds of one batched prefill (vision tower, projector, LLM; no generation)."""
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                   {"type": "text", "text": mme_prompt(r.question)}]}],
                                      add_generation_prompt=True) for r in recs[:batch]]
    proc.tokenizer.padding_side = "left"
    enc = proc(images=[r.image() for r in recs[:batch]], text=texts, return_tensors="pt", padding=True)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            model(**enc, logits_to_keep=1)
            if i:
                times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    data = _cached_split(f"shapes-mme-s{TEST_SEED}-n40-c112", lambda d: write_shapes_mme(d, TEST_SEED, 40, canvas=112))
    recs = load_mme(data / "mme.parquet")
    llava, lproc = load_model("toy-llava")
    packer, pproc = load_model("toy-tokenpacker")
    runs = [("toy LLaVA, 196 tokens", llava, lproc, None), ("toy TokenPacker, 49 packed tokens", packer, pproc, None)]
    runs += [(f"toy LLaVA + {m} r=0.25 (49 tokens)", llava, lproc, m) for m in ("cls", "pool", "uniform", "aim")]
    rows = []
    for name, model, proc, method in runs:
        res = evaluate_mme(model, proc, recs, method=method, ratio=0.25 if method else None, progress=False)
        p = vtc.patch(model, method, ratio=0.25) if method else None
        ms = prefill_ms(model, proc, recs, args.batch, args.repeats)
        if p is not None:
            vtc.unpatch(model)
        rows.append((name, res["scores"], ms))
    cats = list(rows[0][1]["categories"])
    print(f"ShapesMME test split ({len(recs)} questions); prefill of {args.batch} prompts, median of {args.repeats}, "
          f"CPU x{torch.get_num_threads()} threads")
    print("| model | perception | accuracy | " + " | ".join(cats) + " | prefill ms |")
    print("|---|---|---|" + "---|" * len(cats) + "---|")
    for name, s, ms in rows:
        print(f"| {name} | {s['perception']:.1f} | {100 * s['question_accuracy']:.1f}% | "
              + " | ".join(f"{s['categories'][c]['score']:.1f}" for c in cats) + f" | {ms:.1f} |")


if __name__ == "__main__":
    main()
