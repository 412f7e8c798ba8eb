"""The ``vtc`` command: ``vtc eval mme``, ``vtc eval sweep``, ``vtc data shapes-mme``, ``vtc methods``."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TEST_SEED = 3000  # ShapesMME test split; training uses 1000+, validation 2000


def _load(args):
    from .zoo.models import default_model, load_model

    if args.model:
        model, proc = load_model(args.model, args.device)
        return model, proc, args.model
    model, proc, label = default_model(args.device)
    return model, proc, label


def _records(args):
    from .eval.mme_data import load_mme, write_shapes_mme

    if args.data:
        recs = load_mme(args.data)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="shapes-mme-"))
        write_shapes_mme(tmp, TEST_SEED, args.per_category)
        recs = load_mme(tmp / "mme.parquet")
    if args.limit:
        # keep whole images (both questions) so scoring stays valid
        keep_ids = list(dict.fromkeys(r.question_id for r in recs))[: args.limit]
        recs = [r for r in recs if r.question_id in set(keep_ids)]
    return recs


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local checkpoint folder, or toy-llava / toy-qwen2-vl (default: the bundled toy LLaVA)")
    p.add_argument("--data", help="MME parquet file/folder or MME_Benchmark folder (default: ShapesMME test split)")
    p.add_argument("--per-category", type=int, default=40, help="images per category when generating ShapesMME")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N images")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="output folder (predictions.jsonl, results.json); reused to resume")
    p.add_argument("--quiet", action="store_true")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vtc", description="visual-token compression for HF VLMs")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("methods", help="list the available methods")
    ev = sub.add_parser("eval", help="evaluate").add_subparsers(dest="bench", required=True)
    mme = ev.add_parser("mme", help="MME with lmms-eval prompts and scoring")
    _common(mme)
    mme.add_argument("--method", help="compression method (omit for the unpatched model)")
    mme.add_argument("--ratio", type=float)
    mme.add_argument("--tokens", type=int)
    sw = ev.add_parser("sweep", help="methods x ratios on MME -> table.md, sweep.json, sweep.png")
    _common(sw)
    sw.add_argument("--methods", default="cls,random,uniform,pool,fastv,aim")
    sw.add_argument("--ratios", default="1.0,0.5,0.25,0.11")
    data = sub.add_parser("data", help="write synthetic benchmarks").add_subparsers(dest="what", required=True)
    sm = data.add_parser("shapes-mme", help="ShapesMME in the MME_Benchmark folder layout and lmms-eval parquet")
    sm.add_argument("--out", required=True)
    sm.add_argument("--seed", type=int, default=TEST_SEED)
    sm.add_argument("--per-category", type=int, default=40)
    args = ap.parse_args(argv)

    if args.cmd == "methods":
        from . import available_methods
        print("\n".join(available_methods()))
        return 0
    if args.cmd == "data":
        from .eval.mme_data import write_shapes_mme
        print(write_shapes_mme(args.out, args.seed, args.per_category))
        return 0
    from .eval.runner import evaluate_mme, sweep

    model, proc, label = _load(args)
    recs = _records(args)
    cfg = {"model": label, "data": args.data or f"ShapesMME test (seed {TEST_SEED})", "images": len({r.question_id for r in recs})}
    if args.bench == "mme":
        if args.method is None and (args.ratio is not None or args.tokens is not None):
            print("vtc: --ratio/--tokens need --method", file=sys.stderr)
            return 2
        res = evaluate_mme(model, proc, recs, args.out, method=args.method, ratio=args.ratio, tokens=args.tokens,
                           batch_size=args.batch_size, progress=not args.quiet, config=cfg)
        s = res["scores"]
        print(f"model: {label}")
        print(json.dumps({"method": res["config"]["method"], "ratio": args.ratio, "perception": round(s["perception"], 2),
                          "cognition": round(s["cognition"], 2), "question_accuracy": round(s["question_accuracy"], 4),
                          "visual_tokens": [res["compression"]["visual_tokens_before"], res["compression"]["visual_tokens_after"]],
                          "categories": {c: round(v["score"], 2) for c, v in s["categories"].items()}}, indent=1))
        return 0
    out = args.out or "runs/sweep"
    sweep(model, proc, recs, out, methods=args.methods.split(","), ratios=[float(x) for x in args.ratios.split(",")],
                 batch_size=args.batch_size, progress=not args.quiet, config=cfg)
    print(f"model: {label}")
    print((Path(out) / "table.md").read_text())
    print(f"plot: {Path(out) / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
