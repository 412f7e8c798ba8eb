"""Train the bundled toy LLaVA on ShapesMME, reproducibly from a seed, on a CPU.

    python -m vtc.zoo.train_llava --out vtc/zoo/checkpoints/toy-llava

Stage 1: CLIP-style contrastive pre-training of the vision tower against a small caption encoder
(open_clip's ClipLoss), so the tower's CLS token summarises the objects and its attention is meaningful.
Stage 2: projector + language model on captions only (the vision tower frozen): about 20 image-conditioned
tokens per sample teach the LM to read the visual tokens. Stage 3: several ShapesMME question-answer pairs
per image (the lmms-eval MME prompt) plus some captions, the vision tower at a lower learning rate. Seeds for train (1000+),
validation (2000) and test (3000, never used here) differ.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .processor import build_llava_processor
from .shapes import ShapesGenerator

POST_PROMPT = "\nAnswer the question using a single word or phrase."
IMAGE_SIZE, PATCH = 112, 8
TRAIN_SEED, VAL_SEED = 1000, 2000


def toy_llava_config(tok):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=128, intermediate_size=512,
                              num_hidden_layers=4, num_attention_heads=4, projection_dim=128)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       tie_word_embeddings=True)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=True)


class CaptionEncoder(nn.Module):
    """A 2-layer transformer over caption words, mean-pooled (stage 1 only; not shipped)."""

    def __init__(self, vocab: int, dim: int = 128):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(64, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2)
        self.proj = nn.Linear(dim, 128)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        x = self.enc(x, src_key_padding_mask=~mask.bool())
        x = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.proj(x)


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def stage1(model, proc, minutes: float, batch: int, log) -> None:
    from open_clip.loss import ClipLoss

    tok = proc.tokenizer
    gen = ShapesGenerator(TRAIN_SEED)
    vt = model.model.vision_tower
    img_proj = nn.Linear(128, 128)
    txt = CaptionEncoder(len(tok))
    loss_fn = ClipLoss()
    logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
    params = list(vt.parameters()) + list(img_proj.parameters()) + list(txt.parameters()) + [logit_scale]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    est = int(minutes * 60 / 0.9)  # rough steps for the schedule; the clock decides when to stop
    t0, step = time.time(), 0
    while time.time() - t0 < minutes * 60:
        samples = [gen.training_sample() for _ in range(batch)]
        pv = proc.image_processor([s[0] for s in samples], return_tensors="pt")["pixel_values"]
        caps = tok([ShapesGenerator.caption(s[1]) for s in samples], return_tensors="pt", padding=True)
        for g in opt.param_groups:
            g["lr"] = _lr(step, est, 1e-3)
        img = F.normalize(img_proj(vt(pv).pooler_output), dim=-1)
        t = F.normalize(txt(caps["input_ids"], caps["attention_mask"]), dim=-1)
        loss = loss_fn(img, t, logit_scale.exp().clamp(max=100))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0:
            log(f"stage1 step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
        step += 1


def encode_dialogue(tok, image_token_id: int, n_image: int, qa: list[tuple[str, str]], caption: str | None):
    """Token ids and labels (answers only) for one multi-turn sample."""
    ids, labels = [], []

    def add(text: str, learn: bool):
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids.extend(t)
        labels.extend(t if learn else [-100] * len(t))

    add("USER:", False)
    ids.extend([image_token_id] * n_image)
    labels.extend([-100] * n_image)
    turns = [("Describe the image.", caption)] if caption else []
    turns += [(q + POST_PROMPT, a) for q, a in qa]
    for i, (q, a) in enumerate(turns):
        add(("" if i == 0 else "USER: ") + q + " ASSISTANT:", False)
        add(" " + a, True)
        ids.append(tok.eos_token_id)
        labels.append(tok.eos_token_id)
    return ids, labels


def batch_from(samples, proc, image_token_id, n_image, caption_p, rng):
    tok = proc.tokenizer
    rows = []
    for img, scene in samples:
        cap = ShapesGenerator.caption(scene) if rng.random() < caption_p else None
        rows.append(encode_dialogue(tok, image_token_id, n_image, scene.qa, cap))
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    am = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (a, b) in enumerate(rows):  # right padding for training
        ids[i, : len(a)] = torch.tensor(a)
        lab[i, : len(b)] = torch.tensor(b)
        am[i, : len(a)] = 1
    pv = proc.image_processor([s[0] for s in samples], return_tensors="pt")["pixel_values"]
    return ids, am, lab, pv


@torch.no_grad()
def quick_accuracy(model, proc, n_images: int = 60, seed: int = VAL_SEED) -> float:
    """Validation accuracy from the first answer token (yes/no), MME prompt, no compression."""
    from .shapes import CATEGORIES

    tok = proc.tokenizer
    gen = ShapesGenerator(seed)
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    correct = total = 0
    model.eval()
    for i in range(n_images):
        img, scene = gen.sample(CATEGORIES[i % len(CATEGORIES)])
        for q, a in scene.qa:
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q + POST_PROMPT}]}]
            enc = proc(images=[img], text=[proc.apply_chat_template(conv, add_generation_prompt=True)], return_tensors="pt")
            logits = model(**enc).logits[0, -1]
            pred = "Yes" if logits[yes] > logits[no] else "No"
            correct += pred == a
            total += 1
    model.train()
    return correct / total


def language_stage(model, proc, minutes: float, batch: int, log, name: str, caption_p: float, vision_lr: float,
                   seed: int, val_every: int = 100, only_captions: bool = False):
    """Train projector + LM (and the vision tower at ``vision_lr``, 0 = frozen) on captions and/or VQA."""
    gen = ShapesGenerator(seed)
    rng = random.Random(seed)
    cfg = model.config
    n_image = (IMAGE_SIZE // PATCH) ** 2
    vision = list(model.model.vision_tower.parameters())
    for p in vision:
        p.requires_grad_(vision_lr > 0)
    others = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    groups = [{"params": others, "base": 1e-3}] + ([{"params": vision, "base": vision_lr}] if vision_lr > 0 else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    est = int(minutes * 60 / 1.3)
    t0, step, best = time.time(), 0, (-1.0, None)
    model.train()
    while time.time() - t0 < minutes * 60:
        samples = [gen.training_sample() for _ in range(batch)]
        if only_captions:
            for _, sc in samples:
                sc.qa = []
        ids, am, lab, pv = batch_from(samples, proc, cfg.image_token_id, n_image, caption_p, rng)
        for g in opt.param_groups:
            g["lr"] = _lr(step, est, g["base"])
        loss = model(input_ids=ids, attention_mask=am, pixel_values=pv, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            log(f"{name} step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if val_every and step and step % val_every == 0:
            acc = quick_accuracy(model, proc)
            log(f"{name} step {step} val acc {acc:.3f}")
            if acc > best[0]:
                best = (acc, {k: v.detach().clone() for k, v in model.state_dict().items()})
        step += 1
    for p in vision:
        p.requires_grad_(True)
    if not val_every:
        return None
    acc = quick_accuracy(model, proc)
    log(f"{name} final val acc {acc:.3f}")
    if best[1] is not None and best[0] > acc:
        model.load_state_dict(best[1])
        acc = best[0]
    return acc


def main() -> None:
    from transformers import LlavaForConditionalGeneration

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "checkpoints" / "toy-llava"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage1-minutes", type=float, default=6)
    ap.add_argument("--stage2-minutes", type=float, default=9)
    ap.add_argument("--stage3-minutes", type=float, default=25)
    ap.add_argument("--resume", help="a stage checkpoint folder (runs/.../stage1 or stage2) to start from")
    ap.add_argument("--start-stage", type=int, default=1, help="first stage to run (with --resume)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "train_log.txt", "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    proc = build_llava_processor(IMAGE_SIZE, PATCH)
    if args.resume:
        model = LlavaForConditionalGeneration.from_pretrained(args.resume)
    else:
        model = LlavaForConditionalGeneration(toy_llava_config(proc.tokenizer))
    model.set_attn_implementation("sdpa")
    model.train()
    log(f"params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    t0 = time.time()
    if args.start_stage <= 1:
        stage1(model, proc, args.stage1_minutes, 64, log)
        model.save_pretrained(out / "stage1")
    if args.start_stage <= 2:
        language_stage(model, proc, args.stage2_minutes, args.batch, log, "stage2", caption_p=1.0, vision_lr=0.0,
                       seed=TRAIN_SEED + 1, val_every=0, only_captions=True)
        model.save_pretrained(out / "stage2")
    acc = language_stage(model, proc, args.stage3_minutes, args.batch, log, "stage3", caption_p=0.1, vision_lr=2e-4,
                         seed=TRAIN_SEED + 2)
    model.eval()
    model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
    model.generation_config.eos_token_id = proc.tokenizer.eos_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    proc.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({
        "seed": args.seed, "train_seed": TRAIN_SEED, "val_seed": VAL_SEED, "minutes": (time.time() - t0) / 60,
        "stage1_minutes": args.stage1_minutes, "stage2_minutes": args.stage2_minutes,
        "stage3_minutes": args.stage3_minutes, "batch": args.batch, "start_stage": args.start_stage,
        "val_first_token_accuracy": acc, "threads": args.threads,
    }, indent=2))
    log(f"saved to {out} (val acc {acc:.3f}, {(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
