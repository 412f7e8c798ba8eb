"""Every user error of the CLI ends in one clear line and exit status 2, without a traceback, and before any model
loads (issue #20, case 7)."""
import json

import pytest

import vtc.cli as cli
from vtc.eval.mme_data import write_shapes_mme


@pytest.fixture(scope="module")
def mme(tmp_path_factory):
    d = tmp_path_factory.mktemp("mme")
    write_shapes_mme(d, seed=3000, per_category=1)
    return d


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from vtc.eval.videomme_data import write_shapes_video

    return write_shapes_video(tmp_path_factory.mktemp("sv"), 3000, per_cell=1)


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every case here must be refused before that."""
    def load(args):
        raise AssertionError("a model was loaded before the user error was reported")
    monkeypatch.setattr(cli, "_load", load)


def _parquet_with(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _mme_rows(mme, answer):
    import pyarrow.parquet as pq

    rows = pq.read_table(mme / "mme.parquet").to_pylist()
    rows[1]["answer"] = answer
    return rows


def _cases(mme, video, tmp):
    """(name, argv, text the one line must contain)"""
    (tmp / "garbage.parquet").write_bytes(b"not a parquet file at all")
    bad_img = tmp / "badimg" / "existence"
    bad_img.mkdir(parents=True)
    (bad_img / "0000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (bad_img / "0000.txt").write_text("Is there a circle?\tYes\n")
    (tmp / "llm").mkdir()
    (tmp / "llm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp / "empty").mkdir()
    vrows = json.loads((video / "videomme.json").read_text())
    (tmp / "vbad").mkdir()
    (tmp / "vbad" / "data").symlink_to(video / "data")
    (tmp / "vbad" / "videomme.json").write_text(json.dumps([dict(vrows[0], answer="E")]))
    (tmp / "vcorrupt" / "data").mkdir(parents=True)
    (tmp / "vcorrupt" / "videomme.json").write_text(json.dumps([vrows[0]]))
    (tmp / "vcorrupt" / "data" / f"{vrows[0]['videoID']}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage" * 10)
    m = ["eval", "mme", "--quiet"]
    return [
        ("missing data", m + ["--data", str(tmp / "nope")], "no MME data at"),
        ("corrupt parquet", m + ["--data", str(tmp / "garbage.parquet")], "not a readable parquet file"),
        ("corrupt image", m + ["--data", str(tmp / "badimg")], "does not decode"),
        ("gold answer Maybe", m + ["--data", str(_parquet_with(tmp / "maybe.parquet", _mme_rows(mme, "Maybe")))],
         "gold answer 'Maybe'"),
        ("gold answer null", m + ["--data", str(_parquet_with(tmp / "null.parquet", _mme_rows(mme, None)))],
         "gold answer None"),
        ("bad model path", m + ["--data", str(mme), "--model", str(tmp / "nomodel")], "no such folder"),
        ("folder without config", m + ["--data", str(mme), "--model", str(tmp / "empty")], "has no config.json"),
        ("not a VLM", m + ["--data", str(mme), "--model", str(tmp / "llm")], "a LlamaForCausalLM checkpoint"),
        ("unknown method", m + ["--data", str(mme), "--method", "nope", "--ratio", "0.5"], "unknown method 'nope'"),
        ("budget missing", m + ["--data", str(mme), "--method", "cls"], "needs a budget"),
        ("ratio without method", m + ["--data", str(mme), "--ratio", "0.5"], "need --method"),
        ("ratio 1.5", m + ["--ratio", "1.5", "--method", "cls"], "outside (0, 1]"),
        ("ratio 0", m + ["--ratio", "0", "--method", "cls"], "outside (0, 1]"),
        ("sweep ratio 0", ["eval", "sweep", "--ratios", "0.5,0"], "outside (0, 1]"),
        ("sweep ratio 1.5", ["eval", "sweep", "--ratios", "1.5"], "outside (0, 1]"),
        ("sweep unknown method", ["eval", "sweep", "--data", str(mme), "--methods", "cls,nope"], "unknown method"),
        ("method option not key=value", ["eval", "sweep", "--methods", "zipvl:tau"], "'tau' of 'zipvl:tau' is not key"),
        ("zipvl tau 2", m + ["--method", "zipvl:tau=2"], "tau must be a number in (0, 1]"),
        ("zipvl with a ratio", m + ["--method", "zipvl", "--ratio", "0.5"], "sets its own budget"),
        ("unknown option", m + ["--method", "zipvl:bits=3"], "unknown hyperparameter(s) ['bits']"),
        ("convert a non-TokenPacker folder", ["convert", "tokenpacker", str(tmp / "llm"), str(tmp / "out")],
         "not a TokenPacker checkpoint"),
        ("convert a missing folder", ["convert", "tokenpacker", str(tmp / "nope"), str(tmp / "out")], "No such file"),
        ("limit -1", m + ["--limit", "-1"], "must be >= 0"),
        ("batch size 0", m + ["--batch-size", "0"], "must be >= 1"),
        ("per-category 0", m + ["--per-category", "0"], "must be >= 1"),
        ("frames 0", ["eval", "videomme", "--frames", "0"], "must be >= 1"),
        ("video answer outside options", ["eval", "videomme", "--data", str(tmp / "vbad")],
         "gold answer 'E' is not one of the option letters"),
        ("corrupt mp4", ["eval", "videomme", "--data", str(tmp / "vcorrupt")], "does not open"),
    ]


def test_every_user_error_is_one_line_exit_2_no_traceback(mme, video, tmp_path, capsys, no_model):
    cases = _cases(mme, video, tmp_path)
    for name, argv, want in cases:
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse's own errors: usage line + one error line
            code = e.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("usage:")
                 and not line.startswith(" ")]
        assert code == 2, (name, err)
        assert "Traceback" not in err, (name, err)
        assert len(lines) == 1 and want in lines[0], (name, err)
    assert len(cases) == 28


def test_debug_shows_the_traceback(mme, tmp_path, no_model):
    with pytest.raises(cli.UserError, match="no such folder"):
        cli.main(["eval", "mme", "--data", str(mme), "--model", str(tmp_path / "x"), "--debug"])


def test_resume_with_other_settings_is_one_line_and_overwrite_starts_over(mme, tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["eval", "mme", "--data", str(mme), "--quiet", "--out", out]
    assert cli.main(base + ["--method", "cls", "--ratio", "0.11"]) == 0
    capsys.readouterr()
    assert cli.main(base) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vtc:")]
    assert len(err) == 1 and "holds a run with other settings (method:" in err[0] and "--overwrite" in err[0]
    assert cli.main(base + ["--overwrite"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["method"] == "none" and results["config"]["identity"]["method"] is None


def test_default_data_is_written_once_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VTC_CACHE", str(tmp_path))
    calls = []

    def write(d):
        calls.append(d)
        (d / "x").write_text("1")

    a = cli._cached_split("split", write)
    b = cli._cached_split("split", write)
    assert a == b == tmp_path / "data" / "split" and len(calls) == 1 and (a / "x").exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["split"]  # no temporary folder left


def test_help_lists_every_bundled_model(capsys):
    from vtc.zoo.models import TOYS

    with pytest.raises(SystemExit):
        cli.main(["eval", "mme", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(t in text for t in TOYS)
