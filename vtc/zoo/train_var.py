"""Train the toy VAR offline: multi-scale VQ-VAE, then the VAR transformer on its codes, then the judge classifier.

Data: :mod:`vtc.zoo.var_shapes` (16 classes = shape x colour, 64 px). Each stage runs for a wall-clock budget with
:class:`~vtc.zoo.training.ClockedStage` (cosine schedule over the budget, state saved every 5 minutes;
``--resume`` continues a stage from ``<out>/<stage>_state.pt``), logs to ``<out>/<stage>_log.txt``, and writes the
bundle with :func:`vtc.models.var.save_folder` (fp16) plus ``classifier.safetensors``::

    python -m vtc.zoo.train_var --stage vae --minutes 12
    python -m vtc.zoo.train_var --stage var --minutes 30
    python -m vtc.zoo.train_var --stage classifier --minutes 3
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.var import VAR, VQVAE, save_folder
from . import var_shapes as data
from .training import ClockedStage, run_log
from .var_classifier import ShapeClassifier

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8)
TOY_VAE = dict(vocab_size=256, z_channels=16, ch=16, ch_mult=(1, 2, 4, 4), using_sa=True, share_quant_resi=4,
               quant_resi=0.5, patch_nums=PATCH_NUMS, num_res_blocks=1)
TOY_VAR = dict(num_classes=data.NUM_CLASSES, depth=4, embed_dim=192, num_heads=6, patch_nums=PATCH_NUMS)
DEFAULT_OUT = Path(__file__).parent / "checkpoints" / "toy-var"


def _stream(rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = [rng.randrange(data.NUM_CLASSES) for _ in range(n)]
    seeds = [data.TRAIN_SEED + rng.randrange(200_000) for _ in range(n)]
    return data.batch(labels, seeds), torch.tensor(labels)


def train_vae(out: Path, minutes: float, batch: int, resume: bool, log) -> VQVAE:
    torch.manual_seed(0)
    vae = VQVAE(**TOY_VAE)
    vae.quantize.embedding.weight.data.uniform_(-1 / vae.V, 1 / vae.V)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95))
    rng = random.Random(1)
    for step in (stage := ClockedStage(vae, opt, minutes, out / "vae_state.pt", resume)):
        img, _ = _stream(rng, batch)
        rec, vq = vae(img)
        rec_loss = F.mse_loss(rec, img) + 0.5 * (rec - img).abs().mean()
        loss = rec_loss + vq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 2.0)
        opt.step()
        if step % 100 == 0:
            log(f"vae step {step} {stage.progress:.0%} rec {rec_loss.item():.4f} vq {vq.item():.4f}")
    return vae.eval()


@torch.no_grad()
def encode_codes(vae: VQVAE, n_per_class: int, log) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training image's codes, concatenated over scales: (N, L) int64, and labels (N,)."""
    codes, labels = [], []
    for c in range(data.NUM_CLASSES):
        seeds = [data.TRAIN_SEED + i for i in range(n_per_class)]
        for i in range(0, n_per_class, 250):
            img = data.batch([c] * len(seeds[i:i + 250]), seeds[i:i + 250])
            codes.append(torch.cat(vae.img_to_idxBl(img), 1))
            labels.append(torch.full((img.shape[0],), c))
    log(f"encoded {n_per_class} images x {data.NUM_CLASSES} classes")
    return torch.cat(codes), torch.cat(labels)


def train_var(out: Path, vae: VQVAE, minutes: float, batch: int, n_per_class: int, resume: bool, log) -> VAR:
    torch.manual_seed(0)
    var = VAR(vae, **TOY_VAR)
    codes, labels = encode_codes(vae, n_per_class, log)
    splits = [p * p for p in PATCH_NUMS]
    opt = torch.optim.AdamW(var.parameters(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(2)
    hw = PATCH_NUMS[-1]
    for step in (stage := ClockedStage(var, opt, minutes, out / "var_state.pt", resume, warmup=300)):
        pick = torch.randint(len(codes), (batch,), generator=gen)
        idx = codes[pick]
        with torch.no_grad():
            x_in = vae.quantize.teacher_inputs(list(idx.split(splits, 1)), hw)
        logits = var(labels[pick], x_in)
        loss = F.cross_entropy(logits.reshape(-1, vae.V), idx.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                last = logits[:, -hw * hw:].argmax(-1).eq(idx[:, -hw * hw:]).float().mean()
            log(f"var step {step} {stage.progress:.0%} ce {loss.item():.3f} last-scale acc {last.item():.3f}")
    return var.eval()


def train_classifier(out: Path, minutes: float, batch: int, resume: bool, log) -> ShapeClassifier:
    torch.manual_seed(0)
    clf = ShapeClassifier(data.NUM_CLASSES)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    rng = random.Random(3)
    for step in (stage := ClockedStage(clf, opt, minutes, out / "classifier_state.pt", resume, warmup=50)):
        img, lab = _stream(rng, batch)
        img = img + 0.05 * torch.randn_like(img)  # robustness to the VQ-VAE's reconstruction noise
        loss = F.cross_entropy(clf(img), lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log(f"classifier step {step} {stage.progress:.0%} loss {loss.item():.3f}")
    return clf.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["vae", "var", "classifier"], required=True)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--work", type=Path, help="folder for the stage states (default: <out>/../toy-var-work)")
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images-per-class", type=int, default=1500, help="VAR stage: training images per class")
    ap.add_argument("--resume", action="store_true", help="continue the stage from its saved state")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or args.out.parent / "toy-var-work"
    log = run_log(work, f"{args.stage}_log.txt", append=args.resume)
    log(f"args: {vars(args)}")
    if args.stage == "vae":
        vae = train_vae(work, args.minutes, args.batch, args.resume, log)
        torch.save(vae.state_dict(), work / "vae.pt")
    elif args.stage == "var":
        vae = VQVAE(**TOY_VAE)
        vae.load_state_dict(torch.load(work / "vae.pt", weights_only=True))
        var = train_var(work, vae.eval(), args.minutes, args.batch, args.images_per_class, args.resume, log)
        save_folder(vae, var, args.out, extra={"dataset": "vtc.zoo.var_shapes", "classes": [
            data.class_name(c) for c in range(data.NUM_CLASSES)]})
    else:
        from safetensors.torch import save_file
        clf = train_classifier(work, args.minutes, args.batch, args.resume, log)
        args.out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(args.out / "classifier.safetensors"))
        (args.out / "classifier.json").write_text(json.dumps(clf.config))
    args.out.mkdir(parents=True, exist_ok=True)  # the stage's log goes next to the weights
    shutil.copy(work / f"{args.stage}_log.txt", args.out)


if __name__ == "__main__":
    main()
