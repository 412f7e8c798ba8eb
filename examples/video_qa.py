"""Video QA with visual-token compression (LLaVA-OneVision, Qwen2-VL / Qwen2.5-VL videos).

    python examples/video_qa.py --method cls --ratio 0.25
    python examples/video_qa.py --model /path/to/Qwen2-VL-2B-Instruct --video clip.mp4 --frames 32 --method aim \
        --ratio 0.25 --question "What happens in the video?" --options ""

With ``--options`` (comma-separated) the question is asked as a Video-MME multiple-choice item, with lmms-eval's
prompt; the reply's letter is extracted with Video-MME's rule.

Without --model it runs offline on the bundled toy video model (or a labelled random-weight fallback);
without --video it draws and encodes a short clip of a moving square.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import add_compression_args, generate_and_report, load_for_example
from vtc.eval.videomme_scoring import videomme_prompt
from vtc.video import load_video, write_video
from vtc.zoo.models import default_video_model


def demo_clip(path: Path, frames: int = 16, side: int = 112) -> Path:
    """A red square moving left to right on a white background."""
    out = []
    for t in range(frames):
        f = np.full((side, side, 3), 255, dtype=np.uint8)
        x = 4 + t * (side - 28) // max(1, frames - 1)
        f[44:68, x:x + 24] = (220, 40, 40)
        out.append(f)
    return write_video(out, path, fps=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local LLaVA-OneVision / Qwen2-VL / Qwen2.5-VL checkpoint (default: bundled toy "
                    "video model)")
    ap.add_argument("--video", help="video file (default: a generated clip)")
    ap.add_argument("--question", default="Which direction does the red square move?")
    ap.add_argument("--options", default="left,right,up,down",
                    help="comma-separated options for a multiple-choice question ('' for a free question)")
    ap.add_argument("--frames", type=int, default=32, help="frames sampled uniformly (lmms-eval default 32)")
    ap.add_argument("--fps", type=float, default=None, help="sample by frame rate instead")
    add_compression_args(ap, "fraction of visual tokens kept per frame group (default 0.25)")
    args = ap.parse_args()

    model, processor = load_for_example(args, default_video_model, torch.bfloat16)
    path = Path(args.video) if args.video else demo_clip(Path(tempfile.mkdtemp()) / "demo.mp4")
    frames, idx, fps = load_video(path, args.frames, args.fps)
    print(f"video: {path} ({fps:.1f} fps); frames used: {len(idx)} {idx}")

    options = [f"{'ABCD'[i]}. {o.strip()}" for i, o in enumerate(args.options.split(",")[:4])] if args.options else []
    text = videomme_prompt(args.question, options) if options else args.question
    conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    inputs = processor(text=[prompt], videos=[list(frames)], return_tensors="pt").to(args.device)

    if options:
        print("options: " + " | ".join(options))
    generate_and_report(model, processor, inputs, args)


if __name__ == "__main__":
    main()
