"""The toy Qwen2-VL built from a toy LLaVA: an exact copy of its LM, a tower that distils onto its projector."""
import pytest
import torch

from vtc.zoo import train_toy
from vtc.zoo.qwen_from_llava import distill_tower, qwen_from_llava


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llava")
    model = train_toy.Family("llava").new_model()
    with torch.no_grad():  # non-trivial norms, so a wrong mapping can't hide behind ones
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def test_qwen_lm_is_the_llava_lm_on_text(llava_dir):
    fam = train_toy.Family("qwen2-vl")
    qwen, llava = qwen_from_llava(fam, llava_dir)
    qwen.eval(), llava.eval()
    text = "USER: is there a red circle in the image ? ASSISTANT: yes"
    ids = train_toy.Family("llava").tok(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, fam.tok(text, return_tensors="pt")["input_ids"])  # shared vocabulary
    with torch.no_grad():
        ref = llava(input_ids=ids).logits
        out = qwen(input_ids=ids).logits
    n = ref.shape[-1]
    assert out.shape[-1] == n + 4  # the four Qwen vision tokens appended
    assert torch.allclose(out[..., :n], ref, atol=1e-5)
    assert qwen.lm_head.weight.data_ptr() == qwen.model.language_model.embed_tokens.weight.data_ptr()


def test_tower_distils_onto_the_llava_projector(llava_dir):
    torch.manual_seed(0)
    fam = train_toy.Family("qwen2-vl")
    qwen, llava = qwen_from_llava(fam, llava_dir)
    lines = []
    first = distill_tower(qwen, llava, fam, steps=1, batch=2, log=lines.append, lr=0.0)  # lr 0: the start
    last = distill_tower(qwen, llava, fam, steps=30, batch=2, log=lines.append, lr=3e-3)
    assert lines[0].startswith("distill step 0 mse") and len(lines) == 1 + 3
    assert last < 0.7 * first  # a fresh tower's merged tokens move onto the LLaVA's visual tokens


def test_qwen_from_a_non_llava_is_a_clear_error(tmp_path):
    fam = train_toy.Family("qwen2-vl")
    fam.new_model().save_pretrained(tmp_path / "qwen")
    with pytest.raises(ValueError, match="not a toy LLaVA"):
        qwen_from_llava(fam, tmp_path / "qwen")


@pytest.mark.parametrize("argv, message", [
    (["--family", "qwen2-vl", "--start-stage", "1"], "pass --start-stage 2, not --init"),
    (["--family", "llava", "--start-stage", "3"], "--from-llava is for --family llava-next or qwen2-vl"),
])
def test_from_llava_misuse_is_a_clear_error(llava_dir, tmp_path, monkeypatch, argv, message):
    monkeypatch.setattr("sys.argv", ["train_toy", *argv, "--from-llava", str(llava_dir), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=message):
        train_toy.main()
