"""The ``vtc`` command: ``vtc eval mme|videomme|sweep|var``, ``vtc data shapes-mme|shapes-video``, ``vtc methods``.

Everything a user can get wrong (method, budget, hyperparameters, sizes, data, model folder) is checked before a
model loads, so a sweep fails in its first second; a user error prints one line (what was wrong, what is allowed)
and exits 2. Tracebacks only with ``--debug`` or for real bugs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from .eval.run_store import RunError

TEST_SEED = 3000  # ShapesMME / ShapesVideo test split; training uses 1000+, validation 2000


class UserError(Exception):
    """Something the user passed is wrong: printed as one line, exit status 2."""


def _int_at_least(low: int, meaning: str = ""):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{meaning}; got {v}")
        return v
    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0, " (0: all)")


def _ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"ratio {text} is outside (0, 1] (the fraction of visual tokens kept)")
    return v


def _ratios(text: str) -> list[float]:
    return [_ratio(x.strip()) for x in text.split(",") if x.strip()] or [_ratio(text)]


def _methods(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def cache_dir() -> Path:
    """vtc's cache folder for generated data and calibrations: ``$VTC_CACHE``, default ``~/.cache/vtc``."""
    return Path(os.environ.get("VTC_CACHE") or Path.home() / ".cache" / "vtc")


def _cached_split(name: str, write) -> Path:
    """A generated split under the vtc cache (``$VTC_CACHE``, default ``~/.cache/vtc``), written once: later runs
    reuse it instead of leaving a new folder in /tmp each time. Written to a temporary sibling, then renamed."""
    root = cache_dir() / "data"
    final = root / name
    if (final / ".complete").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        write(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            tmp.rename(final)
        except OSError:  # another run finished it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_model_path(name: str | None) -> None:
    """A --model that is not a bundled toy must be a folder with a config.json of a supported VLM class."""
    from .adapters import ADAPTERS
    from .zoo.models import TOYS

    if name is None or name in TOYS:
        return
    path = Path(name)
    if not path.is_dir():
        raise UserError(f"--model {name}: no such folder; pass a local checkpoint folder (save_pretrained layout) "
                        f"or one of {', '.join(TOYS)}")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise UserError(f"--model {name}: the folder has no config.json (not a transformers checkpoint)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise UserError(f"--model {name}: config.json is not valid JSON ({e})") from None
    supported = sorted({n for a in ADAPTERS for n in a.model_classes if n.endswith("ForConditionalGeneration")})
    archs = cfg.get("architectures") or []
    if archs and not any(a in supported for a in archs):
        raise UserError(f"--model {name}: a {', '.join(archs)} checkpoint; vtc evaluates vision-language models: "
                        f"{', '.join(supported)}")


def _is_video(args) -> bool:
    return args.bench == "videomme" or getattr(args, "on", "mme") == "videomme"


def _load(args):
    from .eval.runner import distributed_state
    from .zoo.models import default_model, default_video_model, load_model

    state = distributed_state()
    args.device = args.device or (str(state.device) if state else "cpu")
    if args.model:
        model, proc = load_model(args.model, args.device)
        label = args.model
    else:
        model, proc, label = (default_video_model if _is_video(args) else default_model)(args.device)
    from .adapters import find_adapter

    try:
        find_adapter(model)
    except TypeError as e:
        raise UserError(f"--model {args.model}: {e}") from None
    return model, proc, label


def _token_counts(res: dict) -> list:
    """[visual tokens before, after] (means per item) of an evaluation result."""
    return [res["compression"]["visual_tokens_before"], res["compression"]["visual_tokens_after"]]


def _records(args):
    from .eval.mme_data import load_mme, write_shapes_mme

    """The evaluation records, checked (gold answers, options, images / videos decode) before any model loads."""
    if _is_video(args):
        from .eval.videomme_data import check_videos, load_videomme, write_shapes_video

        data = args.data or _cached_split(f"shapes-video-s{TEST_SEED}-n{args.per_category}",
                                          lambda d: write_shapes_video(d, TEST_SEED, args.per_category))
        recs = load_videomme(data, args.videos)
        recs = recs[: args.limit] if args.limit else recs
        return check_videos(recs)
    from .eval.mme_data import check_records

    if args.data:
        recs = load_mme(args.data)
    else:
        data = _cached_split(f"shapes-mme-s{TEST_SEED}-n{args.per_category}-c{args.canvas}",
                             lambda d: write_shapes_mme(d, TEST_SEED, args.per_category, canvas=args.canvas))
        recs = load_mme(data / "mme.parquet")
    if args.limit:
        # keep whole images (both questions) so scoring stays valid
        keep_ids = set(list(dict.fromkeys(r.question_id for r in recs))[: args.limit])
        recs = [r for r in recs if r.question_id in keep_ids]
    return check_records(recs, args.data or "ShapesMME")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local checkpoint folder, or a bundled toy: toy-llava / toy-qwen2-vl / "
                   "toy-llava-next / toy-llava-onevision / toy-tokenpacker (default: toy-llava; for Video-MME "
                   "toy-llava-onevision)")
    p.add_argument("--data", help="MME: parquet file/folder or MME_Benchmark folder; Video-MME: records "
                   "(parquet/JSON) with data/<videoID>.mp4 (default: the ShapesMME / ShapesVideo test split)")
    p.add_argument("--videos", help="Video-MME: the folder holding data/<videoID>.mp4 when the records live "
                   "elsewhere (lmms-eval's layout: --data <snapshot with the parquet> --videos $HF_HOME/videomme)")
    p.add_argument("--per-category", type=_positive_int, default=40,
                   help="when generating: ShapesMME images per category / ShapesVideo clips per task x duration")
    p.add_argument("--limit", type=_nonnegative_int, default=0,
                   help="evaluate only the first N images (MME) / questions (Video-MME)")
    p.add_argument("--frames", type=_positive_int, default=32, help="Video-MME: frames sampled uniformly per video")
    p.add_argument("--canvas", type=_positive_int, default=112,
                   help="when generating ShapesMME: image side in px (224: the high-resolution split of the toy NeXT)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cpu; under accelerate launch, each process's "
                   "own device)")
    p.add_argument("--out", help="output folder (run.json, predictions.jsonl, results.json); rerun the same "
                   "command to resume (a folder holding a run with other settings is refused)")
    p.add_argument("--overwrite", action="store_true", help="discard what --out holds and start the run again")
    p.add_argument("--max-new-tokens", type=_positive_int, default=16, help="greedy generation length (lmms-eval: 16)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vtc", description="visual-token compression for HF VLMs")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("methods", help="list the available methods")
    ev = sub.add_parser("eval", help="evaluate").add_subparsers(dest="bench", required=True)
    mme = ev.add_parser("mme", help="MME with lmms-eval prompts and scoring")
    _common(mme)
    mme.add_argument("--method", help="compression method, options as name:key=value+key=value (e.g. zipvl:tau=0.95); "
                     "omit for the unpatched model")
    mme.add_argument("--ratio", type=_ratio)
    mme.add_argument("--tokens", type=_positive_int)
    vm = ev.add_parser("videomme", help="Video-MME with lmms-eval prompt and letter extraction")
    _common(vm)
    vm.add_argument("--method", help="compression method, options as name:key=value+key=value (e.g. zipvl:tau=0.95); "
                     "omit for the unpatched model")
    vm.add_argument("--ratio", type=_ratio)
    vm.add_argument("--tokens", type=_positive_int)
    sw = ev.add_parser("sweep", help="methods x ratios on MME or Video-MME -> table.md, sweep.json, sweep.png")
    _common(sw)
    sw.add_argument("--on", default="mme", choices=["mme", "videomme"], help="benchmark to sweep")
    sw.add_argument("--methods", type=_methods, default="cls,random,uniform,pool,fastv,aim",
                    help="comma-separated, each name[:key=value+...]; methods with their own budget (zipvl) run once")
    sw.add_argument("--ratios", type=_ratios, default="1.0,0.5,0.25,0.11", help="comma-separated, each in (0, 1]")
    va = ev.add_parser("var", help="class-conditional generation (VAR): judge class accuracy and FID on the judge's "
                       "features, per method and ratio")
    va.add_argument("--model", help="a VAR folder (vtc.models.var.save_folder layout, with the judge's "
                    "classifier.safetensors); default: the bundled toy VAR")
    va.add_argument("--methods", type=_methods, default="none",
                    help="comma-separated: none (uncompressed) and/or generation KV methods, each name[:key=value+...]")
    va.add_argument("--ratios", type=_ratios, default="0.5", help="fractions of the KV cache kept, comma-separated")
    va.add_argument("--per-class", type=_positive_int, default=20, help="images generated per class")
    va.add_argument("--batch-size", type=_positive_int, default=32)
    va.add_argument("--cfg", type=float, default=1.5)
    va.add_argument("--top-k", type=_nonnegative_int, default=900)
    va.add_argument("--top-p", type=float, default=0.96)
    va.add_argument("--seed", type=int, default=0, help="batch j is generated with seed + j")
    va.add_argument("--device", default="cpu")
    va.add_argument("--out", help="output folder: one sub-folder per run (resumable) and table.md, var.json, "
                    "var.png (accuracy) and var_fid.png (FID) against the fraction of the cache kept")
    va.add_argument("--overwrite", action="store_true", help="discard what --out holds and start again")
    va.add_argument("--quiet", action="store_true")
    va.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    conv = sub.add_parser("convert", help="convert released checkpoints to transformers folders").add_subparsers(
        dest="what", required=True)
    tp = conv.add_parser("tokenpacker", help="a LLaVA-format TokenPacker checkpoint -> a folder vtc.models."
                         "tokenpacker.from_pretrained (and --model) loads")
    tp.add_argument("src", help="local folder of the released checkpoint (config.json with scale_factor, weights)")
    tp.add_argument("dst", help="output folder")
    tp.add_argument("--vision-tower", help="local CLIP-L/336 folder, when the checkpoint holds no tower weights")
    tp.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    data = sub.add_parser("data", help="write synthetic benchmarks").add_subparsers(dest="what", required=True)
    sm = data.add_parser("shapes-mme", help="ShapesMME in the MME_Benchmark folder layout and lmms-eval parquet")
    sm.add_argument("--out", required=True)
    sm.add_argument("--seed", type=int, default=TEST_SEED)
    sm.add_argument("--per-category", type=_positive_int, default=40)
    sm.add_argument("--canvas", type=_positive_int, default=112, help="image side in px (224: the high-resolution split)")
    sv = data.add_parser("shapes-video", help="ShapesVideo in the Video-MME schema (data/<videoID>.mp4 + records)")
    sv.add_argument("--out", required=True)
    sv.add_argument("--seed", type=int, default=TEST_SEED)
    sv.add_argument("--per-cell", type=_positive_int, default=10, help="clips per task type x duration")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (UserError, RunError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"vtc: error: {e}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _user_input(what: str) -> Iterator[None]:
    """Errors raised while checking or reading what the user passed are user errors: one line, exit 2."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, TypeError, OSError, ImportError) as e:
        raise UserError(f"{what}: {e}") from e


def _check_methods(args) -> None:
    """Every (method, budget) the command will run, validated like vtc.patch, before anything loads."""
    from .eval.runner import parse_method_spec, resolve_method, sweep_plan

    if args.bench == "sweep":
        for _, name, hyper, r in sweep_plan(args.methods, args.ratios):
            if r is None or r < 1.0:  # ratio 1.0 is the unpatched run
                resolve_method(name, r, None, hyper)
        return
    args.method, args.hyperparameters = parse_method_spec(args.method) if args.method else (None, {})
    resolve_method(args.method, args.ratio, args.tokens, args.hyperparameters)


def _run(args) -> int:
    if args.cmd == "methods":
        from . import available_methods
        print("\n".join(available_methods()))
        return 0
    if args.cmd == "convert":
        from .models.tokenpacker import convert

        with _user_input(f"converting {args.src}"):
            print(convert(args.src, args.dst, args.vision_tower))
        return 0
    if args.cmd == "data":
        with _user_input(f"writing {args.out}"):
            if args.what == "shapes-video":
                from .eval.videomme_data import write_shapes_video
                print(write_shapes_video(args.out, args.seed, args.per_cell))
            else:
                from .eval.mme_data import write_shapes_mme
                print(write_shapes_mme(args.out, args.seed, args.per_category, canvas=args.canvas))
        return 0
    if args.bench == "var":
        return _eval_var(args)
    from .eval.runner import evaluate_mme, sweep

    if args.bench != "sweep" and args.method is None and (args.ratio is not None or args.tokens is not None):
        raise UserError("--ratio/--tokens need --method (see 'vtc methods')")
    with _user_input("settings"):
        _check_methods(args)
    _check_model_path(args.model)
    generated = not args.data
    with _user_input(f"data {args.data or '(generated)'}"):
        recs = _records(args)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with _user_input(f"model {args.model or '(default)'}"):
        model, proc, label = _load(args)
    video = _is_video(args)
    data = f"Shapes{'Video' if video else 'MME'} test (seed {TEST_SEED})" if generated else str(args.data)
    cfg = {"model": label, "data": data,
           "images" if not video else "questions": len({r.question_id for r in recs})}
    common = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=not args.quiet,
                  config=cfg, overwrite=args.overwrite)
    if args.bench == "videomme":
        from .eval.videomme_runner import evaluate_videomme

        res = evaluate_videomme(model, proc, recs, args.out, frames=args.frames, method=args.method, ratio=args.ratio,
                                tokens=args.tokens, **common, **args.hyperparameters)
        if not res:  # not the main process of a multi-process run
            return 0
        s = res["scores"]
        print(f"model: {label}")
        print(json.dumps({"method": res["config"]["method"], "ratio": args.ratio, "frames": args.frames,
                          "accuracy": round(s["accuracy"], 2), "questions": s["questions"],
                          "visual_tokens": _token_counts(res),
                          **{k: v for k, v in s.items() if k.startswith("by_")}}, indent=1))
        return 0
    if args.bench == "mme":
        res = evaluate_mme(model, proc, recs, args.out, method=args.method, ratio=args.ratio, tokens=args.tokens,
                           **common, **args.hyperparameters)
        if not res:  # not the main process of a multi-process run
            return 0
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
    if not sweep(model, proc, recs, out, methods=args.methods, ratios=args.ratios, **common, **extra):
        return 0  # not the main process of a multi-process run
    print(f"model: {label}")
    print((Path(out) / "table.md").read_text())
    print(f"plot: {Path(out) / 'sweep.png'}")
    return 0


def _eval_var(args) -> int:
    """``vtc eval var``: every (method, ratio) run, then a table and a plot of accuracy / FID vs cache kept."""
    from .eval.runner import parse_method_spec, plot_sweep, resolve_method
    from .eval.var_eval import evaluate_var, var_table
    from .zoo.models import TOY_VAR, load_judge, load_var

    plan = []
    with _user_input("settings"):
        for spec in args.methods:
            if spec == "none":
                plan.append((spec, None, {}, None))
                continue
            name, hyper = parse_method_spec(spec)
            for r in args.ratios:
                resolve_method(name, r, None, hyper)
                plan.append((spec, name, hyper, r))
    folder = Path(args.model) if args.model else TOY_VAR
    with _user_input(f"model {folder}"):
        vae, var = load_var(folder, args.device)
        judge = load_judge(folder, args.device)
    with _user_input("settings"):
        if var.num_classes != judge.config["num_classes"]:
            raise ValueError(f"the judge knows {judge.config['num_classes']} classes, the VAR {var.num_classes}")
    out = Path(args.out or "runs/var")
    rows = []
    for spec, name, hyper, r in plan:
        if name == "hack":  # measured once per model and output folder, unless calibration= is given
            from .hack import with_calibration

            hyper = with_calibration(var, hyper, out / "hack_calibration.json", cfg=args.cfg, top_k=args.top_k,
                                     top_p=args.top_p)
        sub = out / (spec.replace(":", "_").replace("+", "_").replace("=", "-") + ("" if r is None else f"-r{r:g}"))
        res = evaluate_var(var, judge, sub, per_class=args.per_class, batch=args.batch_size, cfg=args.cfg,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, method=name, ratio=r,
                           hyperparameters=hyper, progress=not args.quiet, overwrite=args.overwrite,
                           config={"model": str(folder)})
        rows.append({"method": spec if name else "uncompressed", "ratio": 1.0 if r is None else r,
                     "accuracy": res["accuracy"], "fid": res["fid"], "kv_fraction": res["kv_fraction"],
                     "fid_real_reference": res["fid_real_reference"], "seconds_per_batch": res["seconds_per_batch"]})
    table = var_table(rows)
    (out / "table.md").write_text(table)
    (out / "var.json").write_text(json.dumps(rows, indent=1))
    if len(rows) > 1:
        for key, png, label in (("accuracy", "var.png", "judge class accuracy"),
                                ("fid", "var_fid.png", "FID on the judge's features (lower is better)")):
            plot_sweep(rows, out / png, label, key=key, xlabel="fraction of the KV cache kept (ratio)")
    print(f"model: {folder}")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
