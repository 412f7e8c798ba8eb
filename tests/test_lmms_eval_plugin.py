"""One number, two harnesses: real lmms-eval (the [lmms] extra) runs the bundled toys through vtc's plugin on local
parquet files in the lmms-lab schemas, offline, and its scores equal ``vtc eval`` on the same records,
compressed and uncompressed (issue #21)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[lmms]')")

from vtc.eval.mme_data import load_mme, write_shapes_mme  # noqa: E402
from vtc.eval.runner import evaluate_mme  # noqa: E402
from vtc.eval.videomme_data import load_videomme, write_shapes_video  # noqa: E402
from vtc.eval.videomme_runner import evaluate_videomme  # noqa: E402
from vtc.zoo.models import load_model  # noqa: E402

pytestmark = pytest.mark.lmms


def _task(include: Path, lmms_task: str, name: str, parquet: Path) -> None:
    """lmms-eval's own task yaml with only the data source replaced by a local parquet file."""
    import lmms_eval

    src = Path(lmms_eval.__file__).parent / "tasks" / lmms_task
    text = (src / f"{lmms_task}.yaml").read_text()
    body = text[text.index("test_split:"):]
    folder = include / name
    folder.mkdir(parents=True)
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n"
                                         f"    test: {parquet}\n{body}")
    (folder / "utils.py").write_text(f"from lmms_eval.tasks.{lmms_task}.utils import *  # noqa: F401,F403\n")


def _lmms_eval(tmp: Path, tasks: str, model_args: str) -> dict:
    env = dict(os.environ, HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp / "hf" / "datasets"), WANDB_MODE="disabled")
    out = tmp / f"out-{abs(hash(model_args))}"
    cmd = [sys.executable, "-m", "lmms_eval", "eval", "--model", "vtc", "--model_args", model_args, "--tasks", tasks,
           "--include_path", str(tmp / "tasks"), "--batch_size", "1", "--device", "cpu", "--output_path", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    files = sorted(out.rglob("*results.json"))
    assert files, run.stderr[-3000:]
    return json.loads(files[-1].read_text())["results"], run.stdout + run.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmms")
    write_shapes_mme(tmp / "mme", seed=3000, per_category=2)  # 10 images, 20 questions
    write_shapes_video(tmp / "sv", 3000, per_cell=1)  # 12 clips
    _task(tmp / "tasks", "mme", "vtc_mme", tmp / "mme" / "mme.parquet")
    _task(tmp / "tasks", "videomme", "vtc_videomme", tmp / "sv" / "videomme.parquet")
    (tmp / "hf" / "videomme").mkdir(parents=True)
    (tmp / "hf" / "videomme" / "data").symlink_to(tmp / "sv" / "data")  # lmms-eval's video layout
    return tmp


@pytest.mark.parametrize("method", [None, "cls"])
def test_mme_score_equals_vtc_eval(data, method):
    args = "pretrained=toy-llava" + (f",method={method},ratio=0.25,stats_path={data}/stats.json" if method else "")
    results, log = _lmms_eval(data, "vtc_mme", args)
    model, proc = load_model("toy-llava")
    ours = evaluate_mme(model, proc, load_mme(data / "mme" / "mme.parquet"), batch_size=1, progress=False,
                        method=method, ratio=0.25 if method else None)
    theirs = results["vtc_mme"]["mme_perception_score,none"]
    assert theirs == pytest.approx(ours["scores"]["perception"], abs=1e-9)
    # ShapesMME has perception categories only: lmms-eval then reports no cognition score, ours is 0
    assert results["vtc_mme"].get("mme_cognition_score,none", 0.0) == ours["scores"]["cognition"] == 0.0
    print(f"MME perception, method={method}: lmms-eval {theirs:.2f}, vtc eval {ours['scores']['perception']:.2f}")
    if method:  # the compression stats are logged next to lmms-eval's results
        assert "vtc compression:" in log
        stats = json.loads((data / "stats.json").read_text())
        assert stats["visual_tokens_before"] == 196 and stats["visual_tokens_after"] == 49
        assert stats["compressed_rows"] == 20 and stats["vtc_seconds"] > 0


@pytest.mark.parametrize("method", [None, "uniform"])
def test_videomme_score_equals_vtc_eval(data, method):
    args = "pretrained=toy-llava-onevision,frames=8" + (f",method={method},ratio=0.5" if method else "")
    results, _ = _lmms_eval(data, "vtc_videomme", args)
    model, proc = load_model("toy-llava-onevision")
    ours = evaluate_videomme(model, proc, load_videomme(data / "sv"), frames=8, batch_size=1, progress=False,
                             method=method, ratio=0.5 if method else None)
    theirs = results["vtc_videomme"]["videomme_perception_score,none"]
    assert theirs == pytest.approx(ours["scores"]["accuracy"], abs=1e-9)
    print(f"Video-MME accuracy, method={method}: lmms-eval {theirs:.2f}, vtc eval {ours['scores']['accuracy']:.2f}")
