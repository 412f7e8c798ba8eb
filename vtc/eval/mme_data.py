"""MME data in both real layouts: the official ``MME_Benchmark`` folders and lmms-eval's parquet schema."""
from __future__ import annotations

import hashlib
import json
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class MMERecord:
    question_id: str  # "<category>/<image file>", as in lmms-lab/MME
    question: str
    answer: str  # "Yes" | "No"
    category: str
    image_path: str | None = None
    image_bytes: bytes | None = None

    def image(self) -> Image.Image:
        if self.image_bytes is not None:
            return Image.open(io.BytesIO(self.image_bytes)).convert("RGB")
        return Image.open(self.image_path).convert("RGB")

    def image_data(self) -> bytes:
        return self.image_bytes if self.image_bytes is not None else Path(self.image_path).read_bytes()

    def fingerprint(self) -> str:
        """Question, answer, category and a digest of the image content (for run identities)."""
        digest = hashlib.sha256(self.image_data()).hexdigest()[:16]
        return "\t".join([self.question_id, self.question, self.answer, self.category, digest])


def check_records(records: list[MMERecord], source: str | Path, images: bool = True) -> list[MMERecord]:
    """Raise ValueError naming the first record whose gold answer is not Yes/No or (``images``) whose image does
    not decode, so a bad file fails before a model is loaded, not at scoring time."""
    if not records:
        raise ValueError(f"{source} holds no MME records")
    for r in records:
        if not isinstance(r.answer, str) or r.answer.lower().strip().replace(".", "") not in ("yes", "no"):
            raise ValueError(f"{source}: record {r.question_id!r} has gold answer {r.answer!r}; MME answers are "
                             "'Yes' or 'No' (any case, as lmms-eval reads them)")
        if images:
            try:
                with Image.open(io.BytesIO(r.image_data())) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types for a corrupt file
                raise ValueError(f"{source}: the image of record {r.question_id!r} does not decode ({e})") from None
    return records


def load_mme(path: str | Path) -> list[MMERecord]:
    """Records from a parquet file, a folder of parquet files, or an ``MME_Benchmark`` folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no MME data at {path}")
    if path.is_file() and path.suffix == ".parquet":
        return load_mme_parquet([path])
    parquets = sorted(path.glob("*.parquet")) + sorted(path.glob("data/*.parquet"))
    if parquets:
        return _unique(load_mme_parquet(parquets), path)
    root = path / "MME_Benchmark_release_version" if (path / "MME_Benchmark_release_version").is_dir() else path
    records = list(_iter_folder(root))
    if not records:
        raise ValueError(f"{path} holds neither parquet files nor MME_Benchmark category folders")
    return records


def _unique(records: list[MMERecord], source: Path) -> list[MMERecord]:
    """Drop repeated (question_id, question) records: a folder holding the same shard twice (a copy next to the
    snapshot's ``data/``) must not count its questions twice."""
    seen: dict[tuple[str, str], MMERecord] = {}
    for r in records:
        seen.setdefault((r.question_id, r.question), r)
    if len(seen) < len(records):
        warnings.warn(f"{source}: {len(records) - len(seen)} repeated MME records (the same question id and "
                      "question in several parquet files) counted once", RuntimeWarning, stacklevel=3)
    return list(seen.values())


def load_mme_parquet(files: list[Path]) -> list[MMERecord]:
    """lmms-eval schema: question_id, image ({bytes, path}), question, answer, category."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = []
    for f in files:
        try:
            table = pq.read_table(f)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{f} is not a readable parquet file ({e})") from None
        missing = {"question_id", "image", "question", "answer", "category"} - set(table.column_names)
        if missing:
            raise ValueError(f"{f} lacks MME columns {sorted(missing)}")
        for row in table.to_pylist():
            img = row["image"]
            data = img.get("bytes") if isinstance(img, dict) else img
            out.append(MMERecord(row["question_id"], row["question"], row["answer"], row["category"], image_bytes=data))
    return out


def _iter_folder(root: Path) -> Iterator[MMERecord]:
    """Official layout: <category>/{images/, questions_answers_YN/} or flat <stem>.<img> + <stem>.txt pairs;
    each .txt holds two ``question<TAB>Yes|No`` lines."""
    for cat_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        cat = cat_dir.name
        if (cat_dir / "questions_answers_YN").is_dir():
            qa_dir, img_dir = cat_dir / "questions_answers_YN", cat_dir / "images"
        else:
            qa_dir = img_dir = cat_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            img = next((img_dir / (txt.stem + e) for e in IMAGE_EXTS if (img_dir / (txt.stem + e)).exists()), None)
            if img is None:
                continue
            for line in txt.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                if "\t" not in line:
                    raise ValueError(f"{txt}: line {line!r} is not 'question<TAB>Yes|No'")
                q, a = line.rsplit("\t", 1)
                yield MMERecord(f"{cat}/{img.name}", q, a.strip(), cat, image_path=str(img))


def write_shapes_mme(out: str | Path, seed: int, per_category: int, canvas: int = 112) -> Path:
    """Write a ShapesMME split in both layouts: ``MME_Benchmark_release_version/`` folders and ``mme.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..zoo.shapes import CATEGORIES, ShapesGenerator

    out = Path(out)
    root = out / "MME_Benchmark_release_version"
    gen = ShapesGenerator(seed, canvas=canvas)
    rows = []
    for cat in CATEGORIES:
        (root / cat).mkdir(parents=True, exist_ok=True)
        for i in range(per_category):
            img, scene = gen.sample(cat)
            name = f"{i:04d}.png"
            img.save(root / cat / name)
            lines = [f"{q}{' Please answer yes or no.'}\t{a}" for q, a in scene.qa]
            (root / cat / f"{i:04d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
            data = (root / cat / name).read_bytes()
            for q, a in scene.qa:
                rows.append({"question_id": f"{cat}/{name}", "image": {"bytes": data, "path": name},
                             "question": q + " Please answer yes or no.", "answer": a, "category": cat})
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.replace_schema_metadata(hf_features_metadata(MME_FEATURES)), out / "mme.parquet")
    return out


#: lmms-lab/MME's column types, as ``datasets`` records them in a parquet file's schema metadata
MME_FEATURES = {"question_id": "string", "image": "Image", "question": "string", "answer": "string",
                "category": "string"}


def hf_features_metadata(features: dict[str, Any]) -> dict[bytes, bytes]:
    """Parquet schema metadata in the form ``datasets`` writes: with it, ``datasets.load_dataset("parquet", ...)``
    (and so lmms-eval) decodes the ``image`` column as images. ``features``: column -> "Image", a dtype, or
    ["dtype"] for a list."""
    def one(t: Any) -> dict:
        if isinstance(t, list):
            return {"feature": one(t[0]), "_type": "List"}
        return {"_type": "Image"} if t == "Image" else {"dtype": t, "_type": "Value"}
    info = {"info": {"features": {k: one(v) for k, v in features.items()}}}
    return {b"huggingface": json.dumps(info).encode()}
