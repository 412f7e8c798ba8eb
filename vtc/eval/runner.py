"""Batched, resumable MME evaluation of a (possibly patched) model, and method x ratio sweeps."""
from __future__ import annotations

import ast
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

import vtc
from vtc.api import describe_method

from .generation import image_replies
from .mme_data import MMERecord
from .mme_scoring import mme_prompt, mme_scores
from . import LMMS_EVAL_VERSION
from .run_store import RunStore, model_identity, records_digest, versions


def _key(r: MMERecord) -> str:
    return f"{r.question_id}\t{r.question}"


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"zipvl:tau=0.9+kv=evict"`` -> ``("zipvl", {"tau": 0.9, "kv": "evict"})``: a method name with options
    (numbers, booleans and None are read as Python literals, anything else stays a string)."""
    name, _, opts = spec.partition(":")
    hyper: dict[str, Any] = {}
    for item in filter(None, (o.strip() for o in opts.split("+"))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"method option {item!r} of {spec!r} is not key=value (e.g. zipvl:tau=0.9+kv=evict)")
        try:
            hyper[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            hyper[key.strip()] = value.strip()
    return name.strip(), hyper


def own_budget(method: str) -> bool:
    """Whether a method sets its own budget (ZipVL's tau), so a sweep runs it once rather than per ratio."""
    from ..registry import METHODS

    cls = METHODS.get(method)
    return cls is not None and cls.budget_rule == "own"


def sweep_plan(methods: Sequence[str], ratios: Sequence[float]) -> list[tuple[str, str, dict[str, Any], float | None]]:
    """(spec, name, hyperparameters, ratio) of every run a sweep makes: each method spec at every ratio, or once
    (ratio None) for a method that sets its own budget."""
    plan = []
    for spec in methods:
        name, hyper = parse_method_spec(spec)
        plan += [(spec, name, hyper, r) for r in ([None] if own_budget(name) else ratios)]
    return plan


def bench_score(res: dict, bench: str) -> tuple[float, float, dict[str, float]]:
    """(headline score, question accuracy in [0, 1], per-category scores) of an MME or Video-MME result."""
    s = res["scores"]
    if bench == "mme":
        return s["perception"], s["question_accuracy"], {c: v["score"] for c, v in s["categories"].items()}
    return s["accuracy"], s["accuracy"] / 100, s["by_task_type"]


def resolve_method(method: str | None, ratio: float | None, tokens: int | None, hyperparameters: dict):
    """The validated method of a run (None: the unpatched model); a budget without a method is an error."""
    if method is None:
        if ratio is not None or tokens is not None or hyperparameters:
            raise ValueError("ratio / tokens / hyperparameters were given without a method")
        return None
    return vtc.build_method(method, ratio, tokens, **hyperparameters)


def _generate(model, processor, batch: list[MMERecord], max_new_tokens: int) -> list[str]:
    return image_replies(model, processor, [mme_prompt(r.question) for r in batch], [r.image() for r in batch],
                         max_new_tokens)


def run_identity(model: Any, bench: str, method: Any, records: Sequence[Any], settings: dict) -> dict:
    """What makes two runs' predictions interchangeable: model (+ weights digest), method with every
    hyperparameter (None: unpatched), the records' digest, generation ``settings``, library versions."""
    return {"bench": bench, "model": model_identity(model),
            "method": describe_method(method) if method is not None else None,
            "data": records_digest(r.fingerprint() for r in records), **settings, **versions()}


def run_resumable(
    model: Any,
    records: Sequence[Any],
    key: Callable[[Any], str],
    generate: Callable[[list], list[str]],
    describe: Callable[[Any, str], dict],
    out: Path | None,
    method: Any,
    identity: dict,
    batch_size: int,
    desc: str,
    progress: bool,
    overwrite: bool = False,
) -> tuple[list[dict], list, float]:
    """Generate for every record not yet in ``out/predictions.jsonl`` (appended batch by batch, so an interrupted
    run resumes), patching the model with ``method`` (a built :class:`~vtc.methods.base.Method`) for the run;
    returns (predictions in record order, this run's compression stats, seconds spent generating).

    ``out`` is opened as a :class:`~vtc.eval.run_store.RunStore`: its lock is held for the run and a folder holding
    another run's ``identity`` is refused (``overwrite`` discards it). With a method, each prediction also records
    its row's ``visual_tokens`` [before, after] and ``llm_visual_fraction``, so a resumed run still reports them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    state = distributed_state()
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    if world > 1 and not out:
        raise ValueError("a multi-process run (accelerate launch) needs an output folder to merge its processes")
    with contextlib.ExitStack() as stack:
        store = None
        with (state.main_process_first() if state else contextlib.nullcontext()):  # rank 0 checks / writes run.json
            if out:
                store = stack.enter_context(RunStore(out, identity, overwrite, rank=rank))
        done = store.done if store else {}
        todo = [r for r in records if key(r) not in done]
        mine = todo[rank::world]  # this process's share of what is left
        patch = vtc.patch(model, method) if method is not None else None
        t_gen = 0.0
        try:
            label = f"{desc} {method.describe() if method is not None else 'none'}"
            bar = tqdm(total=len(records), initial=len(records) - len(todo), disable=not progress or rank != 0,
                       desc=label)
            for i in range(0, len(mine), batch_size):
                batch = list(mine[i:i + batch_size])
                n_stats = len(patch.stats) if patch else 0
                t0 = time.perf_counter()
                preds = generate(batch)
                t_gen += time.perf_counter() - t0
                rows = _row_compression(model, patch.stats[n_stats] if patch and len(patch.stats) > n_stats else None,
                                        len(batch))
                recs = [{"key": key(r), **describe(r, p), **row} for r, p, row in zip(batch, preds, rows)]
                if store:
                    store.append(recs)
                else:
                    done.update((rec["key"], rec) for rec in recs)
                bar.update(len(batch) * world)
            bar.close()
            stats = patch.stats if patch else []
        finally:
            if patch:
                patch.remove()
        if state:
            state.wait_for_everyone()
        if rank != 0:
            return [], stats, t_gen
        if store and world > 1:
            done = store.merge([key(r) for r in records])
        return [done[key(r)] for r in records], stats, t_gen


def distributed_state():
    """accelerate's process state when this run was started by ``accelerate launch`` with several processes
    (records are then shared out by rank), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState()


def is_main_process() -> bool:
    state = distributed_state()
    return state is None or state.is_main_process


def _row_compression(model: Any, prefill: Any, n_rows: int) -> list[dict]:
    """Per batch row of one compressed prefill: visual tokens [before, after] and the visual tokens processed per
    LLM layer as a fraction of the uncompressed count (a FLOPs proxy that counts in-LLM pruning)."""
    if prefill is None or len(prefill.tokens_before) != n_rows:
        return [{} for _ in range(n_rows)]
    n_layers = getattr(getattr(model.config, "text_config", model.config), "num_hidden_layers", 0)
    rows = []
    for b, (t0, t1) in enumerate(zip(prefill.tokens_before, prefill.tokens_after)):
        row = {"visual_tokens": [t0, t1]}
        if t0 and n_layers:
            per_layer = [prefill.layer_tokens.get(j, [t1] * (b + 1))[b] for j in range(n_layers)]
            row["llm_visual_fraction"] = sum(per_layer) / (n_layers * t0)
        for key, value in (("important_fraction", prefill.important_fraction(b)), ("kv_bits", prefill.kv_bits)):
            if value is not None:
                row[key] = value
        rows.append(row)
    return rows


def compression_summary(preds: list[dict], stats: list, method: str | None, t_gen: float) -> dict:
    """Mean visual tokens before/after and LLM-visual-token fraction over the predictions (resumed ones
    included), and this run's compression and generation seconds."""
    tokens = [p["visual_tokens"] for p in preds if "visual_tokens" in p]

    def mean(key: str) -> float | None:
        vals = [p[key] for p in preds if key in p]
        return sum(vals) / len(vals) if vals else None

    fraction = mean("llm_visual_fraction")
    return {
        "visual_tokens_before": sum(t[0] for t in tokens) / len(tokens) if tokens else None,
        "visual_tokens_after": sum(t[1] for t in tokens) / len(tokens) if tokens else None,
        "llm_visual_fraction": fraction if fraction is not None else (None if method else 1.0),
        "important_fraction": mean("important_fraction"),  # attention-site methods: tokens found important
        "kv_bits": mean("kv_bits"),  # bits per cached value after the prefill (statistics included; fp16 = 16)
        "compress_seconds_this_run": sum(s.seconds for s in stats),
        "generate_seconds_this_run": t_gen,
    }


def evaluate_mme(
    model: Any,
    processor: Any,
    records: Sequence[MMERecord],
    out_dir: str | Path | None = None,
    method: str | None = None,
    ratio: float | None = None,
    tokens: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    config: dict | None = None,
    progress: bool = True,
    overwrite: bool = False,
    **hyperparameters: Any,
) -> dict:
    """Evaluate on MME records; with ``method`` the model is patched for the run and unpatched after.

    Predictions are appended to ``out_dir/predictions.jsonl`` as they come, so an interrupted run resumes
    where it stopped (only with the same settings: see :mod:`vtc.eval.run_store`; ``overwrite`` starts over);
    ``out_dir/results.json`` gets the config, scores, compression stats and predictions.
    """
    built = resolve_method(method, ratio, tokens, hyperparameters)
    processor.tokenizer.padding_side = "left"
    out = Path(out_dir) if out_dir else None
    settings = {"max_new_tokens": max_new_tokens, "prompt": f"lmms-eval {LMMS_EVAL_VERSION} MME default"}
    identity = run_identity(model, "mme", built, records, settings) if out else {}
    preds, stats, t_gen = run_resumable(
        model, records, _key, lambda b: _generate(model, processor, b, max_new_tokens),
        lambda r, p: {"question_id": r.question_id, "category": r.category, "question": r.question,
                      "answer": r.answer, "prediction": p},
        out, built, identity, batch_size, "MME", progress, overwrite)
    if not is_main_process():
        return {}
    return save_results(out, {"method": method or "none", "ratio": ratio, "tokens": tokens,
                              "hyperparameters": hyperparameters, "batch_size": batch_size, **settings,
                              **({"identity": identity} if identity else {}), **(config or {})},
                        mme_scores(preds), compression_summary(preds, stats, method, t_gen), preds)


def save_results(out: Path | None, config: dict, scores: dict, compression: dict, preds: list[dict]) -> dict:
    """The run's result dict (config, scores, compression, predictions), also written to ``out/results.json``."""
    result = {"config": config, "scores": scores, "compression": compression, "predictions": preds}
    if out:
        (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


def sweep(
    model: Any,
    processor: Any,
    records: Sequence[Any],
    out_dir: str | Path,
    methods: Sequence[str] = ("cls", "random", "uniform", "pool"),
    ratios: Sequence[float] = (1.0, 0.5, 0.25, 0.11),
    batch_size: int = 8,
    progress: bool = True,
    config: dict | None = None,
    bench: str = "mme",
    **eval_kwargs: Any,
) -> list[dict]:
    """Evaluate every method at every ratio on MME (``bench="mme"``) or Video-MME (``"videomme"``; ``eval_kwargs``
    such as ``frames`` go to the evaluator). Ratio 1.0 is exactly the unpatched model, so it is run once.
    Writes ``table.md``, ``sweep.json``, ``sweep.png`` (score vs ratio, one line per method) and
    ``sweep_flops.png`` (score vs the LLM-visual-token fraction)."""
    if bench == "mme":
        evaluate, ylabel = evaluate_mme, "MME perception score"
    elif bench == "videomme":
        from .videomme_runner import evaluate_videomme as evaluate
        ylabel = "Video-MME accuracy (%)"
    else:
        raise ValueError(f"bench must be 'mme' or 'videomme'; got {bench!r}")
    out = Path(out_dir)
    rows = []
    base = evaluate(model, processor, records, out / "none_1.0", batch_size=batch_size, progress=progress,
                    config=config, **eval_kwargs)
    for spec, name, hyper, r in sweep_plan(methods, ratios):  # an own-budget method (zipvl: tau) runs once
        folder = spec.replace(":", "_").replace("+", "_")
        res = base if r is not None and r >= 1.0 else evaluate(
            model, processor, records, out / (folder if r is None else f"{folder}_{r}"), method=name, ratio=r,
            batch_size=batch_size, progress=progress, config=config, **eval_kwargs, **hyper)
        if not res:  # another process of a multi-process run: the main process scores and writes
            continue
        score, acc, cats = bench_score(res, bench)
        rows.append({"method": spec, "ratio": r, "score": score, "accuracy": acc,
                     "tokens": res["compression"]["visual_tokens_after"],
                     "llm_fraction": res["compression"]["llm_visual_fraction"] or 1.0, "categories": cats,
                     **{k: res["compression"].get(k) for k in ("important_fraction", "kv_bits")
                        if res["compression"].get(k) is not None}})
    if not is_main_process():
        return []
    if any(r["ratio"] is None for r in rows):  # the unpatched reference of the own-budget table
        score, acc, _ = bench_score(base, bench)
        rows.insert(0, {"method": "none", "ratio": None, "score": score, "accuracy": acc,
                        "important_fraction": 1.0, "kv_bits": 16.0})
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    (out / "table.md").write_text(sweep_table(rows))
    ratio_rows = [r for r in rows if r["ratio"] is not None]
    if ratio_rows:
        plot_sweep(ratio_rows, out / "sweep.png", ylabel=ylabel)
        plot_sweep(ratio_rows, out / "sweep_flops.png", ylabel=ylabel, x="llm_fraction")
    return rows


def sweep_table(rows: list[dict]) -> str:
    own = [r for r in rows if r["ratio"] is None]
    rows = [r for r in rows if r["ratio"] is not None]
    return (_ratio_table(rows) if rows else "") + (_own_budget_table(own) if own else "")


def _ratio_table(rows: list[dict]) -> str:
    ratios = sorted({r["ratio"] for r in rows}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lookup = {(r["method"], r["ratio"]): r for r in rows}
    head = "| method | " + " | ".join(f"r={x:g}" for x in ratios) + " |\n|---|" + "---|" * len(ratios) + "\n"
    body = ""
    for m in methods:
        cells = []
        for x in ratios:
            r = lookup.get((m, x))
            cells.append(f"{r['score']:.1f} ({100 * r['accuracy']:.1f}%)" if r else "")
        body += f"| {m} | " + " | ".join(cells) + " |\n"
    body += "\nVisual tokens processed per LLM layer, as a fraction of the uncompressed model (FLOPs proxy):\n\n"
    body += "| method | " + " | ".join(f"r={x:g}" for x in ratios) + " |\n|---|" + "---|" * len(ratios) + "\n"
    for m in methods:
        cells = [f"{lookup[(m, x)]['llm_fraction']:.3f}" if (m, x) in lookup else "" for x in ratios]
        body += f"| {m} | " + " | ".join(cells) + " |\n"
    return head + body


def _own_budget_table(own: list[dict]) -> str:
    body = ("\nMethods that set their own budget (score; tokens each LLM layer found important, text included; "
            "bits per cached value after the prefill, statistics included, fp16 = 16):\n\n"
            "| method | score | important fraction | KV bits |\n|---|---|---|---|\n")
    for r in own:
        imp, bits = r.get("important_fraction"), r.get("kv_bits")
        body += (f"| {r['method']} | {r['score']:.1f} ({100 * r['accuracy']:.1f}%) | "
                 f"{'' if imp is None else f'{imp:.3f}'} | {'' if bits is None else f'{bits:.2f}'} |\n")
    return body


def plot_sweep(rows: list[dict], path: str | Path, ylabel: str, key: str = "score", x: str = "ratio",
               xlabel: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r[x], r[key]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log")
    if x == "ratio":
        ticks = sorted({r["ratio"] for r in rows})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel(xlabel or ("fraction of visual tokens kept" if x == "ratio" else
                             "visual tokens per LLM layer / uncompressed (FLOPs proxy)"))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
