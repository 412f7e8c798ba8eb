import pytest
import torch

from vtc.zoo.tiny import left_pad, llava_prompt, tiny_llava

N_TOKENS = 64  # 64x64 image, patch 8 -> 8x8 grid


@pytest.fixture
def make_llava():
    def make(**kw):
        kw.setdefault("image_size", 64)
        return tiny_llava(**kw)
    return make


@pytest.fixture
def llava_batch():
    """Two different images, prompts of different lengths, left padded."""
    g = torch.Generator().manual_seed(1)
    pv = torch.randn(2, 3, 64, 64, generator=g)
    rows = [llava_prompt(N_TOKENS, [1, 5, 6], [7, 8, 9]), llava_prompt(N_TOKENS, [1, 5], [7, 8, 9, 10, 11, 12])]
    ids, am = left_pad(rows)
    return {"input_ids": ids, "attention_mask": am, "pixel_values": pv, "rows": rows}


def single_row(batch, i, *keys):
    """Row ``i`` of a left-padded batch (``batch["rows"]`` holds the unpadded ids) as its own batch of one, with
    row ``i`` of each per-row tensor in ``keys``."""
    row = batch["rows"][i]
    return {"input_ids": torch.tensor([row]), "attention_mask": torch.ones(1, len(row), dtype=torch.long),
            **{k: batch[k][i:i + 1] for k in keys}}


def greedy(model, batch, n=6, **kw):
    return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"], max_new_tokens=n, do_sample=False, **kw)


from dataclasses import dataclass  # noqa: E402

from vtc.methods.base import Method, ScoreRequest, Selection  # noqa: E402


@dataclass
class ScoreRecorder(Method):
    """A vision-site method that keeps every token and records the packed layouts and scores it was given."""

    ratio: float | None = None
    tokens: int | None = None
    kind: str = "cls_prob"
    layer: int = 1
    name = "recorder"
    sites = ("vision",)

    def __post_init__(self):
        self.seen = []

    def score_requests(self):
        return [ScoreRequest(self.kind, (self.layer,))]

    def select_views(self, visual):
        self.seen.append((visual.layout, visual.scores[(self.kind, self.layer)].clone()))
        return Selection(torch.arange(visual.layout.view.numel()))


@pytest.fixture(autouse=True, scope="session")
def _vtc_cache(tmp_path_factory):
    """Generated benchmark splits go to a per-session folder, not the user's ~/.cache/vtc (subprocesses inherit)."""
    import os

    old = os.environ.get("VTC_CACHE")
    os.environ["VTC_CACHE"] = str(tmp_path_factory.mktemp("vtc-cache"))
    yield
    if old is None:
        os.environ.pop("VTC_CACHE", None)
    else:
        os.environ["VTC_CACHE"] = old
