"""Video-MME data: records in the lmms-eval schema (parquet or JSON) plus ``data/<videoID>.mp4`` videos."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

VIDEO_EXTS = (".mp4", ".MP4", ".mkv")
#: ShapesVideo's domain and sub-category: real Video-MME names, because lmms-eval's aggregation only accepts those
DOMAIN, SUB_CATEGORY = "Life Record", "Daily Life"
FIELDS = ("videoID", "question_id", "duration", "domain", "sub_category", "task_type", "question", "options", "answer")


@dataclass
class VideoMMERecord:
    videoID: str
    question_id: str
    duration: str  # short | medium | long
    domain: str
    sub_category: str
    task_type: str
    question: str
    options: list[str]  # ["A. ...", "B. ...", "C. ...", "D. ..."]
    answer: str  # a letter
    video_path: str | None = None

    def fingerprint(self) -> str:
        """Every field and the video's file size (videos are too large to hash; for run identities)."""
        size = Path(self.video_path).stat().st_size if self.video_path else -1
        return "\t".join([self.videoID, self.question_id, self.duration, self.task_type, self.question,
                          "|".join(self.options), self.answer, str(size)])

    def check(self) -> None:
        """Raise ValueError if the options are not ``"A. ..."``-style or the answer is not one of their letters."""
        letters = [o.strip()[:1] for o in self.options]
        if not letters or any(not (o.strip()[:1].isalpha() and o.strip()[1:2] == ".") for o in self.options):
            raise ValueError(f"question {self.question_id!r}: options must look like 'A. ...'; got {self.options!r}")
        if self.answer not in letters:
            raise ValueError(f"question {self.question_id!r}: gold answer {self.answer!r} is not one of the option "
                             f"letters {letters}")


def check_videos(records: list[VideoMMERecord]) -> list[VideoMMERecord]:
    """Raise ValueError naming the first video that does not open or has no frames (before a model is loaded)."""
    from ..video import count_frames

    for path in dict.fromkeys(r.video_path for r in records):
        try:
            n = count_frames(path)
        except Exception as e:  # decord / PyAV raise their own types for a corrupt file
            raise ValueError(f"video {path} does not open ({type(e).__name__}: {e})") from None
        if n < 1:
            raise ValueError(f"video {path} has no frames")
    return records


def _find_video(root: Path, video_id: str) -> str | None:
    for folder in (root / "data", root):
        for ext in VIDEO_EXTS:
            if (folder / (video_id + ext)).exists():
                return str(folder / (video_id + ext))
    return None


def load_videomme(path: str | Path, video_dir: str | Path | None = None) -> list[VideoMMERecord]:
    """Records from a parquet/JSON file or a folder holding one (``videomme.parquet``, ``test-*.parquet`` or
    ``*.json``); videos are looked up as ``<video_dir or the folder>/data/<videoID>.mp4`` (or .MP4/.mkv), so
    lmms-eval's split layout works: the parquet in the dataset snapshot, ``video_dir=$HF_HOME/videomme``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no Video-MME data at {path}")
    files = [path] if path.is_file() else (sorted(path.glob("*.parquet")) + sorted(path.glob("videomme/*.parquet"))
                                           or sorted(path.glob("*.json")))
    if not files:
        raise ValueError(f"{path} holds no Video-MME parquet or JSON records")
    rows: list[dict] = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                rows += pq.read_table(f).to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{f} is not a readable parquet file ({e})") from None
        else:
            try:
                data = json.loads(f.read_text())
            except ValueError as e:
                raise ValueError(f"{f} is not valid JSON ({e})") from None
            if not isinstance(data, list):
                raise ValueError(f"{f} must hold a JSON list of Video-MME records")
            rows += data
    root = Path(video_dir) if video_dir else (path if path.is_dir() else path.parent)
    if not rows:
        raise ValueError(f"{path} holds no Video-MME records")
    out: list[VideoMMERecord] = []
    seen: set[str] = set()
    for row in rows:
        missing = [k for k in FIELDS if k not in row]
        if missing:
            raise ValueError(f"a Video-MME record lacks {missing} (question_id={row.get('question_id')})")
        rec = VideoMMERecord(**{k: row[k] for k in FIELDS})
        rec.options = list(rec.options)
        rec.check()
        rec.video_path = _find_video(root, rec.videoID)
        if rec.video_path is None:
            raise FileNotFoundError(f"no video for {rec.videoID} under {root / 'data'} ({'/'.join(VIDEO_EXTS)})")
        if rec.question_id in seen:
            continue  # the same record in two files (a copied shard): counted once
        seen.add(rec.question_id)
        out.append(rec)
    return out


def write_shapes_video(out: str | Path, seed: int, per_cell: int = 2, side: int = 112) -> Path:
    """Write a ShapesVideo split: ``data/<videoID>.mp4`` and the records as ``videomme.parquet`` and
    ``videomme.json``; ``per_cell`` clips for each task type x duration, one question each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..video import write_video
    from .mme_data import hf_features_metadata
    from ..zoo.shapes_video import DURATIONS, FPS, TASKS, ShapesVideoGenerator

    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    gen = ShapesVideoGenerator(seed, side=side)
    records = []
    for duration in DURATIONS:
        for task, task_type in TASKS.items():
            for _ in range(per_cell):
                clip = gen.clip(task, duration)
                vid = f"shapes-{seed}-{len(records):04d}"
                write_video(clip.frames, out / "data" / f"{vid}.mp4", fps=FPS)
                records.append(VideoMMERecord(vid, f"{vid}-1", duration, DOMAIN, SUB_CATEGORY, task_type,
                                              clip.question, clip.options, clip.answer))
    rows = [{k: v for k, v in asdict(r).items() if k != "video_path"} for r in records]
    features = {k: ["string"] if k == "options" else "string" for k in FIELDS}
    pq.write_table(pa.Table.from_pylist(rows).replace_schema_metadata(hf_features_metadata(features)),
                   out / "videomme.parquet")
    (out / "videomme.json").write_text(json.dumps(rows, indent=1))
    return out
