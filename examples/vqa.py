"""Image VQA with visual-token compression.

    python examples/vqa.py --question "Is there a circle in the image?" --method cls --ratio 0.25
    python examples/vqa.py --model /path/to/llava-1.5-7b-hf --image photo.jpg --question "What is shown?"

Without --model it runs the bundled toy LLaVA offline; without --image it draws a ShapesMME scene.
"""
from __future__ import annotations

import argparse

import torch
from PIL import Image, ImageDraw

from _common import add_compression_args, generate_and_report, load_for_example
from vtc.zoo.models import default_model


def overlay(image: Image.Image, keep: torch.Tensor, side: int, out: str) -> None:
    """Save the processor's view of ``image`` with dropped patches dimmed and kept ones outlined."""
    w, h = image.size
    s = side / min(w, h)
    img = image.convert("RGB").resize((max(side, round(w * s)), max(side, round(h * s))), Image.BICUBIC)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    g = int(round(keep.numel() ** 0.5))
    cell = side / g
    shade = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(shade)
    for i, k in enumerate(keep.tolist()):
        r, c = divmod(i, g)
        box = (c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1)
        if k:
            d.rectangle(box, outline=(255, 40, 40, 255))
        else:
            d.rectangle(box, fill=(0, 0, 0, 150))
    Image.alpha_composite(img.convert("RGBA"), shade).convert("RGB").save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local llava-hf checkpoint folder (default: bundled toy model)")
    ap.add_argument("--image", help="image path (default: a generated ShapesMME scene)")
    ap.add_argument("--question", default="Is there a circle in the image?")
    add_compression_args(ap, "fraction of visual tokens kept (default 0.25)")
    ap.add_argument("--save-overlay", metavar="PNG", help="write the image with kept patches highlighted")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated scene")
    args = ap.parse_args()

    model, processor = load_for_example(args, default_model, torch.float16)

    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        from vtc.zoo.shapes import ShapesGenerator
        image, scene = ShapesGenerator(args.seed).sample("existence")
        print("image: generated ShapesMME scene:", ShapesGenerator.caption(scene))

    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(args.device)
    if "pixel_values" in inputs and args.device == "cuda":
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)

    p = generate_and_report(model, processor, inputs, args)
    if p is not None:
        if args.save_overlay:
            side = inputs["pixel_values"].shape[-1]
            overlay(image, p.last_kept()[0], side, args.save_overlay)
            print(f"overlay: {args.save_overlay}")


if __name__ == "__main__":
    main()
