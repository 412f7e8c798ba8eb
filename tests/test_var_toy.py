"""The bundled toy VAR: its VQ-VAE, its judge, generation quality on a seeded sample, the eval verb and the example."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vtc
from vtc.eval.var_eval import evaluate_var, judge
from vtc.zoo import var_shapes as data
from vtc.zoo.models import TOY_VAR, load_judge, load_var

ROOT = Path(__file__).parent.parent
# thresholds set from measured runs of the bundled toy (measured: MSE 0.0108, judge 100 % on real and 89 % on
# reconstructed held-out images; 87.5 % of a 2-per-class generated sample, chance 6.25 %)
MAX_RECON_MSE, MIN_JUDGE_REAL, MIN_JUDGE_RECON, MIN_GEN_ACCURACY = 0.02, 0.95, 0.7, 0.6


@pytest.fixture(scope="module")
def toy():
    vae, var = load_var(TOY_VAR)
    return vae, var, load_judge(TOY_VAR)


def test_vqvae_round_trip_and_judge_on_held_out_images(toy):
    vae, _, clf = toy
    img, labels = data.split(4, test=True)  # 64 held-out images
    with torch.no_grad():
        codes = vae.img_to_idxBl(img)
        rec = vae.idxBl_to_img(codes)
    assert [c.shape[1] for c in codes] == [p * p for p in vae.patch_nums]
    assert torch.nn.functional.mse_loss(rec, img).item() < MAX_RECON_MSE
    real_acc = judge(clf, (img + 1) / 2)[0].eq(labels).float().mean().item()
    rec_acc = judge(clf, (rec + 1) / 2)[0].eq(labels).float().mean().item()
    assert real_acc >= MIN_JUDGE_REAL and rec_acc >= MIN_JUDGE_RECON


def test_toy_generates_the_asked_class(toy):
    """A seeded sample of 2 images per class (32): the judge sees the asked class far above chance (1/16)."""
    _, var, clf = toy
    res = evaluate_var(var, clf, None, per_class=2, batch=32, seed=0, progress=False)
    assert res["accuracy"] >= MIN_GEN_ACCURACY
    again = evaluate_var(var, clf, None, per_class=2, batch=32, seed=0, progress=False)
    assert again["accuracy"] == res["accuracy"] and again["fid"] == res["fid"]  # deterministic for a seed


def test_eval_resumes_and_compares_methods(toy, tmp_path):
    _, var, clf = toy
    out = tmp_path / "run"
    first = evaluate_var(var, clf, out, per_class=1, batch=8, method="snapkv", ratio=0.3, progress=False)
    assert (out / "results.json").exists() and first["kv_fraction"] < 0.5
    calls = []
    original = var.generate
    var.generate = lambda *a, **k: calls.append(1) or original(*a, **k)  # noqa: E731
    try:
        second = evaluate_var(var, clf, out, per_class=1, batch=8, method="snapkv", ratio=0.3, progress=False)
    finally:
        del var.generate
    assert calls == [] and second["accuracy"] == first["accuracy"]  # nothing generated again
    assert vtc.get_patch(var) is None


def test_cli_eval_var_table(tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "vtc", "eval", "var", "--per-class", "1", "--batch-size", "16",
                        "--methods", "none,hack,streaming", "--ratios", "0.3", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "var.json").read_text())
    assert [x["method"] for x in rows] == ["uncompressed", "hack", "streaming"]
    assert rows[0]["kv_fraction"] == 1.0 and all(x["kv_fraction"] < 0.6 for x in rows[1:])
    assert (out / "hack_calibration.json").exists() and (out / "var.png").exists()
    bad = subprocess.run([sys.executable, "-m", "vtc", "eval", "var", "--methods", "snapkv", "--ratios", "1.5"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "ratio" in bad.stderr and "Traceback" not in bad.stderr


def test_example_generates_offline(tmp_path):
    png = tmp_path / "img.png"
    env = {**os.environ, "VTC_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "generate_var.py"), "--class", "5", "--n", "2",
                        "--method", "hack", "--ratio", "0.3", "--out", str(png)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert png.exists() and "KV cache: peak" in r.stdout and "judge sees" in r.stdout
    assert list((tmp_path / "cache" / "hack").glob("*.json"))  # the calibration went to the vtc cache
