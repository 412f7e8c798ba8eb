"""Class-conditional generation quality without downloads: class accuracy and an FID on a judge classifier's features.

The judge (:class:`vtc.zoo.var_classifier.ShapeClassifier`, trained on the same synthetic classes as the toy VAR)
says which class each generated image shows; the Fréchet distance between the judge's 128-d features of generated
and of held-out real images measures how far the generated distribution is from the real one (the same formula as
FID, on another network's features, so its numbers compare only with each other). Both are deterministic for a
seed: batch j of the plan is generated with seed ``seed + j``. Runs are resumable (:class:`RunStore`).
"""
from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .run_store import RunStore, model_identity, versions


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, D), in float64; the trace of
    the matrix square root from the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric, so no complex parts)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, V = torch.linalg.eigh(s_a)
    root_a = V @ torch.diag(w.clamp_min(0).sqrt()) @ V.T
    tr_cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_cross)


@torch.no_grad()
def judge(classifier: torch.nn.Module, images01: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes (N,) and features (N, D) of images in [0, 1]."""
    preds, feats = [], []
    dev = next(classifier.parameters()).device
    for i in range(0, images01.shape[0], batch):
        x = images01[i:i + batch].to(dev).float() * 2 - 1
        f = classifier.features(x)
        feats.append(f.cpu())
        preds.append(classifier.out(f).argmax(-1).cpu())
    return torch.cat(preds), torch.cat(feats)


@functools.lru_cache(maxsize=4)
def real_reference(classifier: torch.nn.Module, per_class: int, num_classes: int, offset: int = 0) -> torch.Tensor:
    """Judge features of ``per_class`` held-out real images of every class (``offset`` picks another set); kept for
    the next run of a sweep, which compares with the same images (do not modify the returned tensor)."""
    from ..zoo import var_shapes as data

    labels = [c for c in range(num_classes) for _ in range(per_class)]
    seeds = [data.TEST_SEED + offset + i for _ in range(num_classes) for i in range(per_class)]
    return judge(classifier, (data.batch(labels, seeds) + 1) / 2)[1]


def plan(num_classes: int, per_class: int, batch: int) -> list[list[int]]:
    """The class labels of each generation batch: every class ``per_class`` times, in class order."""
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    return [labels[i:i + batch] for i in range(0, len(labels), batch)]


def evaluate_var(var: Any, classifier: torch.nn.Module, out: str | Path | None, per_class: int = 50,
                 batch: int = 32, cfg: float | None = 1.5, top_k: int = 900, top_p: float = 0.96, seed: int = 0,
                 method: str | None = None, ratio: float | None = None, hyperparameters: dict | None = None,
                 classes: Sequence[int] | None = None, progress: bool = True, overwrite: bool = False,
                 config: dict | None = None) -> dict:
    """Generate ``per_class`` images of each class (with ``method`` at ``ratio`` when given), judge them and return
    {accuracy, fid, fid_real_reference, per_class accuracy, kv bytes (peak, and of an uncompressed cache), seconds}.
    ``out``: a folder for run.json / predictions.jsonl / results.json (rerun the same command to resume)."""
    import vtc

    hyper = dict(hyperparameters or {})
    num_classes = var.num_classes
    classes = list(classes) if classes is not None else list(range(num_classes))
    batches = [[classes[c] for c in b] for b in plan(len(classes), per_class, batch)]
    m = vtc.build_method(method, ratio, None, **hyper) if method else None
    identity = {"model": model_identity(var), "method": vtc.api.describe_method(m) if m else None,
                "settings": {"per_class": per_class, "batch": batch, "cfg": cfg, "top_k": top_k, "top_p": top_p,
                             "seed": seed, "classes": classes}, "judge": model_identity(classifier),
                "versions": versions()}
    rows: dict[str, dict] = {}
    store = RunStore(out, identity, overwrite) if out else None
    with (vtc.patched(var, m) if m else contextlib.nullcontext()), (store or contextlib.nullcontext()):
        done = store.done if store else {}
        for j, labels in enumerate(tqdm(batches, desc=f"var {method or 'uncompressed'}", disable=not progress)):
            key = f"batch{j}"
            if key in done:
                rows[key] = done[key]
                continue
            t0 = time.perf_counter()
            imgs = var.generate(labels, cfg=cfg, top_k=top_k, top_p=top_p, seed=seed + j)
            secs = time.perf_counter() - t0
            cache = var.last_cache
            preds, feats = judge(classifier, imgs)
            row = {"key": key, "labels": labels, "preds": preds.tolist(),
                   "feats": [[round(x, 5) for x in f] for f in feats.tolist()], "seconds": secs,
                   "kv_peak_bytes": cache.peak_bytes, "kv_dense_bytes": cache.dense_peak_bytes}
            if store:
                store.append([row])
            rows[key] = row
    ordered = [rows[f"batch{j}"] for j in range(len(batches))]
    labels = torch.tensor([c for r in ordered for c in r["labels"]])
    preds = torch.tensor([p for r in ordered for p in r["preds"]])
    feats = torch.tensor([f for r in ordered for f in r["feats"]])
    real = real_reference(classifier, per_class, num_classes)
    real_b = real_reference(classifier, per_class, num_classes, offset=500_000)
    correct = preds.eq(labels)
    res = {
        "config": {**(config or {}), "method": method, "ratio": ratio, "hyperparameters": hyper,
                   **identity["settings"]},
        "accuracy": float(correct.float().mean()),
        "fid": frechet_distance(feats, real[torch.isin(torch.arange(real.shape[0]) // per_class,
                                                       torch.tensor(classes))]),
        "fid_real_reference": frechet_distance(real_b, real),
        "per_class_accuracy": {c: float(correct[labels == c].float().mean()) for c in classes},
        "images": int(labels.numel()),
        "kv_peak_bytes": max(r["kv_peak_bytes"] for r in ordered),
        "kv_dense_bytes": max(r["kv_dense_bytes"] for r in ordered),
        "seconds_per_batch": sum(r["seconds"] for r in ordered) / len(ordered),
    }
    res["kv_fraction"] = res["kv_peak_bytes"] / res["kv_dense_bytes"]
    if out:
        (Path(out) / "results.json").write_text(json.dumps(res, indent=1))
    return res


def var_table(rows: list[dict]) -> str:
    """Markdown: method, ratio, judge accuracy, FID (and the real-vs-real reference), KV kept, time."""
    head = ("| method | cache kept (ratio) | accuracy | FID (judge features) | real-vs-real FID | KV peak / "
            "uncompressed | s / batch |\n|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['method']} | {r['ratio']:g} | {100 * r['accuracy']:.1f}% | {r['fid']:.2f} | "
        f"{r['fid_real_reference']:.2f} | {r['kv_fraction']:.3f} | {r['seconds_per_batch']:.2f} |\n" for r in rows)
