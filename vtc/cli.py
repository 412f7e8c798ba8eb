"""The ``vtc`` command: ``vtc eval mme|videomme|sweep``, ``vtc data shapes-mme|shapes-video``, ``vtc methods``."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TEST_SEED = 3000  # ShapesMME / ShapesVideo test split; training uses 1000+, validation 2000


def _is_video(args) -> bool:
    return args.bench == "videomme" or getattr(args, "on", "mme") == "videomme"


def _load(args):
    from .zoo.models import default_model, default_video_model, load_model

    if args.model:
        model, proc = load_model(args.model, args.device)
        return model, proc, args.model
    return (default_video_model if _is_video(args) else default_model)(args.device)


def _token_counts(res: dict) -> list:
    """[visual tokens before, after] (means per item) of an evaluation result."""
    return [res["compression"]["visual_tokens_before"], res["compression"]["visual_tokens_after"]]


def _records(args):
    from .eval.mme_data import load_mme, write_shapes_mme

    if _is_video(args):
        from .eval.videomme_data import load_videomme, write_shapes_video

        if not args.data:
            args.data = write_shapes_video(tempfile.mkdtemp(prefix="shapes-video-"), TEST_SEED, args.per_category)
        recs = load_videomme(args.data)
        return recs[: args.limit] if args.limit else recs
    if args.data:
        recs = load_mme(args.data)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="shapes-mme-"))
        write_shapes_mme(tmp, TEST_SEED, args.per_category, canvas=args.canvas)
        recs = load_mme(tmp / "mme.parquet")
    if args.limit:
        # keep whole images (both questions) so scoring stays valid
        keep_ids = list(dict.fromkeys(r.question_id for r in recs))[: args.limit]
        recs = [r for r in recs if r.question_id in set(keep_ids)]
    return recs


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local checkpoint folder, or toy-llava / toy-qwen2-vl / toy-llava-next "
                   "(default: the bundled toy LLaVA; for Video-MME the default video model, see README)")
    p.add_argument("--data", help="MME: parquet file/folder or MME_Benchmark folder; Video-MME: records "
                   "(parquet/JSON) with data/<videoID>.mp4 (default: the ShapesMME / ShapesVideo test split)")
    p.add_argument("--per-category", type=int, default=40,
                   help="when generating: ShapesMME images per category / ShapesVideo clips per task x duration")
    p.add_argument("--limit", type=int, default=0,
                   help="evaluate only the first N images (MME) / questions (Video-MME)")
    p.add_argument("--frames", type=int, default=32, help="Video-MME: frames sampled uniformly per video")
    p.add_argument("--canvas", type=int, default=112,
                   help="when generating ShapesMME: image side in px (224: the high-resolution split of the toy NeXT)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="output folder (predictions.jsonl, results.json); reused to resume")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy generation length (lmms-eval: 16)")
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
    vm = ev.add_parser("videomme", help="Video-MME with lmms-eval prompt and letter extraction")
    _common(vm)
    vm.add_argument("--method", help="compression method (omit for the unpatched model)")
    vm.add_argument("--ratio", type=float)
    vm.add_argument("--tokens", type=int)
    sw = ev.add_parser("sweep", help="methods x ratios on MME or Video-MME -> table.md, sweep.json, sweep.png")
    _common(sw)
    sw.add_argument("--on", default="mme", choices=["mme", "videomme"], help="benchmark to sweep")
    sw.add_argument("--methods", default="cls,random,uniform,pool,fastv,aim")
    sw.add_argument("--ratios", default="1.0,0.5,0.25,0.11")
    data = sub.add_parser("data", help="write synthetic benchmarks").add_subparsers(dest="what", required=True)
    sm = data.add_parser("shapes-mme", help="ShapesMME in the MME_Benchmark folder layout and lmms-eval parquet")
    sm.add_argument("--out", required=True)
    sm.add_argument("--seed", type=int, default=TEST_SEED)
    sm.add_argument("--per-category", type=int, default=40)
    sm.add_argument("--canvas", type=int, default=112, help="image side in px (224: the high-resolution split)")
    sv = data.add_parser("shapes-video", help="ShapesVideo in the Video-MME schema (data/<videoID>.mp4 + records)")
    sv.add_argument("--out", required=True)
    sv.add_argument("--seed", type=int, default=TEST_SEED)
    sv.add_argument("--per-cell", type=int, default=10, help="clips per task type x duration")
    args = ap.parse_args(argv)

    if args.cmd == "methods":
        from . import available_methods
        print("\n".join(available_methods()))
        return 0
    if args.cmd == "data":
        if args.what == "shapes-video":
            from .eval.videomme_data import write_shapes_video
            print(write_shapes_video(args.out, args.seed, args.per_cell))
        else:
            from .eval.mme_data import write_shapes_mme
            print(write_shapes_mme(args.out, args.seed, args.per_category, canvas=args.canvas))
        return 0
    from .eval.runner import evaluate_mme, sweep

    if args.bench != "sweep" and args.method is None and (args.ratio is not None or args.tokens is not None):
        print("vtc: --ratio/--tokens need --method", file=sys.stderr)
        return 2
    generated = not args.data
    model, proc, label = _load(args)
    recs = _records(args)
    video = _is_video(args)
    data = f"Shapes{'Video' if video else 'MME'} test (seed {TEST_SEED})" if generated else str(args.data)
    cfg = {"model": label, "data": data,
           "images" if not video else "questions": len({r.question_id for r in recs})}
    if args.bench == "videomme":
        from .eval.videomme_runner import evaluate_videomme

        res = evaluate_videomme(model, proc, recs, args.out, frames=args.frames, method=args.method, ratio=args.ratio,
                                tokens=args.tokens, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                progress=not args.quiet, config=cfg)
        s = res["scores"]
        print(f"model: {label}")
        print(json.dumps({"method": res["config"]["method"], "ratio": args.ratio, "frames": args.frames,
                          "accuracy": round(s["accuracy"], 2), "questions": s["questions"],
                          "visual_tokens": _token_counts(res),
                          **{k: v for k, v in s.items() if k.startswith("by_")}}, indent=1))
        return 0
    if args.bench == "mme":
        res = evaluate_mme(model, proc, recs, args.out, method=args.method, ratio=args.ratio, tokens=args.tokens,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=not args.quiet,
                           config=cfg)
        s = res["scores"]
        print(f"model: {label}")
        print(json.dumps({"method": res["config"]["method"], "ratio": args.ratio,
                          "perception": round(s["perception"], 2),
                          "cognition": round(s["cognition"], 2), "question_accuracy": round(s["question_accuracy"], 4),
                          "visual_tokens": _token_counts(res),
                          "categories": {c: round(v["score"], 2) for c, v in s["categories"].items()}}, indent=1))
        return 0
    out = args.out or "runs/sweep"
    extra = {"bench": "videomme", "frames": args.frames} if video else {}
    extra["max_new_tokens"] = args.max_new_tokens
    sweep(model, proc, recs, out, methods=args.methods.split(","), ratios=[float(x) for x in args.ratios.split(",")],
          batch_size=args.batch_size, progress=not args.quiet, config=cfg, **extra)
    print(f"model: {label}")
    print((Path(out) / "table.md").read_text())
    print(f"plot: {Path(out) / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
