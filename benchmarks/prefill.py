"""Prefill time of a LLaVA-1.5-, LLaVA-NeXT- or OneVision-video-shaped model, unpatched vs patched, in one process.

    python benchmarks/prefill.py                      # CPU-sized LLM, ratios 0.5 / 0.25 / 0.11
    python benchmarks/prefill.py --device cuda --llm-layers 32 --llm-width 4096   # full 7B shape on a GPU
    python benchmarks/prefill.py --model llava-next --methods globalcom2,cls,uniform --ratios 0.25,0.1
    python benchmarks/prefill.py --model onevision-video --methods cls,aim --ratios 0.25 --frames 32
    python benchmarks/prefill.py --llm-layers 32 --methods aim,aim:pagerank=survivors --ratios 0.4375  # string options
    python benchmarks/prefill.py --model llava-next --mixed --methods cls,uniform --ratios 0.25   # two image sizes

``onevision-video``: SigLIP-so400m/14-384 shape (27 layers, 1152 wide, 729 patches, no CLS; ``--vision-layers``
shrinks its depth for a CPU run, and the ideal then counts the shrunk tower), each frame pooled 2x2 to
14x14 = 196 tokens, 32 frames = 6,272 visual tokens + 1 newline, Qwen2 LM (scaled like the Llama).

Vision tower: CLIP ViT-L/14-336 shape (24 layers, 1024 wide, 577 tokens), random weights. The Llama LM is
scaled down in depth/width by default so a run fits a CPU. Prompt: 576 visual + ~40 text tokens; for
``llava-next`` a 672x672 image = thumbnail + 2x2 crops = 2,880 visual tokens + 48 newline tokens.
Prints the measured speedup, the FLOP-ideal speedup, vtc's own time as % of the unpatched prefill, the KV cache
the prefill leaves (MiB), on a GPU the peak extra memory of the prefill, and with ``--decode N`` the time per
generated token. ``--batch B`` runs B prompts (each its own random image) per forward pass.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import vtc  # noqa: E402
from vtc.adapters.hf import output_cache  # noqa: E402
from vtc.eval.runner import parse_method_spec  # noqa: E402
from flops import llama_flops, projector_flops, vit_flops  # noqa: E402


def build(args):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
                              LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig)

    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=args.llm_width, intermediate_size=args.llm_width * 11 // 4,
                       num_hidden_layers=args.llm_layers, num_attention_heads=args.llm_width // 128,
                       num_key_value_heads=args.llm_width // 128, max_position_embeddings=4096)
    common = dict(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                  vision_feature_select_strategy="default")
    if args.model == "onevision-video":
        siglip = SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                                    num_hidden_layers=args.vision_layers or 27, num_attention_heads=16)
        qwen = Qwen2Config(vocab_size=152064, hidden_size=args.llm_width, intermediate_size=args.llm_width * 37 // 7,
                           num_hidden_layers=args.llm_layers, num_attention_heads=args.llm_width // 128,
                           num_key_value_heads=max(1, args.llm_width // 512), max_position_embeddings=32768)
        cfg = LlavaOnevisionConfig(vision_config=siglip, text_config=qwen, image_token_id=151646, video_token_id=151647,
                                   vision_feature_layer=-1, vision_feature_select_strategy="full")
        cls = LlavaOnevisionForConditionalGeneration
    elif args.model == "llava-next":  # llava-v1.6 pinpoints
        cfg, cls = LlavaNextConfig(**common, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336],
                                                                   [336, 1008]]), LlavaNextForConditionalGeneration
    else:
        cfg, cls = LlavaConfig(**common), LlavaForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(args.device):
        model = cls(cfg)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    return model.to(dtype).eval(), dtype


def mixed_batch(args, model, dtype) -> None:
    """LLaVA-NeXT, one batch of two images of different sizes (672x672 and 336x672): prefill time and the positions
    the LLM prefills (after compression a batch should be as long as its longest kept row, not longer)."""
    sizes = [[672, 672], [336, 672]]
    pv = torch.randn(2, 5, 3, 336, 336, device=args.device, dtype=dtype)
    image_sizes = torch.tensor(sizes, device=args.device)
    with torch.inference_mode():
        counts = [len(f) for f in model.model.get_image_features(pv, image_sizes, return_dict=True).pooler_output]
    rows = [[1] + list(range(10, 45)) + [32000] * n + [50, 51, 52, 53] for n in counts]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=args.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=args.device)
    seen: list[int] = []
    model.model.language_model.layers[0].register_forward_pre_hook(
        lambda mod, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    configs = [("none", 1.0)] + [(m, float(r)) for m in args.methods.split(",") for r in args.ratios.split(",")]
    times: dict[tuple[str, float], list[float]] = {c: [] for c in configs}
    info: dict[tuple[str, float], tuple[list[int], int]] = {}
    for rep in range(args.repeats + 1):
        for c in configs:
            p = vtc.patch(model, c[0], ratio=c[1]) if c[0] != "none" else None
            seen.clear()
            sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=image_sizes, logits_to_keep=1)
            sync()
            if rep:
                times[c].append(time.perf_counter() - t0)
            info[c] = (p.stats[-1].tokens_after if p is not None else counts, seen[0])
            if p is not None:
                vtc.unpatch(model)
    base = statistics.median(times[("none", 1.0)])
    print(f"LLaVA-NeXT mixed batch: images {sizes[0]} and {sizes[1]} ({counts[0]} and {counts[1]} visual tokens), "
          f"LLM {args.llm_layers}L x {args.llm_width}; median of {args.repeats}")
    print(f"{'method':8s} {'ratio':>5s} {'visual kept':>13s} {'LLM positions':>13s} {'longest row':>11s} "
          f"{'prefill ms':>10s} {'speedup':>7s}")
    for c in configs:
        kept, positions = info[c]
        longest = max(len(r) - n + k for r, n, k in zip(rows, counts, kept))
        t = statistics.median(times[c])
        print(f"{c[0]:8s} {c[1]:5.2f} {str(kept):>13s} {positions:13d} {longest:11d} {1e3 * t:10.1f} {base / t:6.2f}x")


def prefill_flops(cfg, visual: int, text: int, layer_visual: dict[int, int] | None = None, crops: int = 1,
                  patches: int = 577, projected: int | None = None) -> float:
    """Vision tower + projector + LLM; ``layer_visual`` gives visual tokens entering later layers (in-LLM pruning).
    ``crops`` views (AnyRes crops or video frames) of ``patches`` tokens each go through the tower, and
    ``projected`` tokens through the projector (vtc selects after projection/packing)."""
    v, t = cfg.vision_config, cfg.text_config
    per_layer = [text + (layer_visual or {}).get(j, visual) for j in range(t.num_hidden_layers)]
    return (crops * vit_flops(patches, v.num_hidden_layers, v.hidden_size, v.intermediate_size)
            + projector_flops(projected if projected is not None else visual, v.hidden_size, t.hidden_size)
            + llama_flops(per_layer, t.num_hidden_layers, t.hidden_size, t.intermediate_size,
                          t.num_attention_heads, t.num_key_value_heads))


def cache_mib(cache) -> float:
    """Bytes held by a transformers KV cache's key/value tensors, in MiB."""
    layers = getattr(cache, "layers", None) or []
    total = sum(t.numel() * t.element_size() for layer in layers for t in (getattr(layer, "keys", None),
                                                                            getattr(layer, "values", None))
                if isinstance(t, torch.Tensor))
    return total / 2**20


def prompt(args, dtype) -> tuple[torch.Tensor, dict, int, dict]:
    """The benchmark prompt: input ids (36 text tokens, the visual tokens, 4 more), the pixel inputs, the number of
    visual tokens and the tower geometry (views, patches per view, tokens projected) that the FLOP count needs."""
    token, patches = 32000, 577
    if args.model == "onevision-video":  # each frame: 27x27 SigLIP patches pooled to 14x14; one newline at the end
        crops, n_visual, token, patches = args.frames, args.frames * 196 + 1, 151647, 729
        projected = args.frames * 729
        inputs = {"pixel_values_videos": torch.randn(args.batch, args.frames, 3, 384, 384, device=args.device,
                                                     dtype=dtype)}
    elif args.model == "llava-next":  # 672x672: thumbnail 576 + 48 rows x (48 tokens + newline)
        crops, n_visual, projected = 5, 576 + 48 * 49, 5 * 576
        inputs = {"pixel_values": torch.randn(args.batch, crops, 3, 336, 336, device=args.device, dtype=dtype),
                  "image_sizes": torch.tensor([[672, 672]] * args.batch, device=args.device)}
    else:
        crops, n_visual, projected = 1, 576, 576
        inputs = {"pixel_values": torch.randn(args.batch, 3, 336, 336, device=args.device, dtype=dtype)}
    ids = torch.tensor([[1] + list(range(10, 45)) + [token] * n_visual + [50, 51, 52, 53]] * args.batch,
                       device=args.device)
    return ids, inputs, n_visual, dict(crops=crops, patches=patches, projected=projected)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="llava", choices=["llava", "llava-next", "onevision-video"])
    ap.add_argument("--frames", type=int, default=32, help="onevision-video: frames (196 tokens each)")
    ap.add_argument("--vision-layers", type=int, default=0, help="onevision-video: SigLIP depth (0: 27, the real one)")
    ap.add_argument("--llm-layers", type=int, default=8)
    ap.add_argument("--llm-width", type=int, default=2048)
    ap.add_argument("--methods", default="cls,uniform,fastv,aim",
                    help="aim: merge to the ratio + prune with layers scaled from (13, 21)/32; fastv: k=2 (paper); "
                    "name:key=value+key=value sets string options, e.g. aim:pagerank=survivors")
    ap.add_argument("--ratios", default="0.5,0.25,0.11")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: default)")
    ap.add_argument("--batch", type=int, default=1, help="prompts per forward pass, each with its own random image")
    ap.add_argument("--decode", type=int, default=0,
                    help="also time generate() for this many new tokens and report decode ms/token (0: off)")
    ap.add_argument("--mixed", action="store_true",
                    help="llava-next: one batch of two images of different sizes (prefill length and time)")
    ap.add_argument("--kernels", choices=["auto", "torch", "triton"], default="auto",
                    help="vtc.kernels backend (triton: Triton kernels on CUDA; torch: the reference)")
    args = ap.parse_args()
    from vtc import kernels

    kernels.set_backend(args.kernels)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, dtype = build(args)
    if args.mixed:
        if args.model != "llava-next":
            raise SystemExit("--mixed needs --model llava-next")
        return mixed_batch(args, model, dtype)
    ids, inputs, n_visual, geometry = prompt(args, dtype)
    n_text = 40
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run_once() -> tuple[float, float, float]:
        """Prefill seconds, the KV cache it leaves (MiB, summed over its tensors), peak extra GPU memory (MiB)."""
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **inputs)
        sync()
        dt = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20 if cuda else float("nan")
        return dt, cache_mib(output_cache(out)), peak

    class _Clock:
        """generate() streamer that timestamps each new token (its first put() is the prompt)."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, _tokens) -> None:
            sync()
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    def decode_ms() -> float:
        """Milliseconds per generated token after the first (prefill excluded), over ``--decode`` tokens."""
        clock = _Clock()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.decode + 1,
                           min_new_tokens=args.decode + 1, do_sample=False, streamer=clock, **inputs)
        return 1e3 * (clock.stamps[-1] - clock.stamps[1]) / args.decode

    configs = [("none", 1.0)] + [(m, float(r)) for m in args.methods.split(",") for r in args.ratios.split(",")]
    times: dict[tuple[str, float], list[float]] = {c: [] for c in configs}
    overhead: dict[tuple[str, float], list[float]] = {c: [] for c in configs}
    kv: dict[tuple[str, float], float] = {}
    peak: dict[tuple[str, float], list[float]] = {c: [] for c in configs}
    dec: dict[tuple[str, float], list[float]] = {c: [] for c in configs}
    kept: dict[tuple[str, float], int] = {}
    layer_kept: dict[tuple[str, float], dict[int, int]] = {}
    # round-robin so drift hits every config alike; round 0 is warm-up; on a GPU one extra, untimed round
    # measures vtc's own time with the device synchronized around it (else it absorbs queued tower kernels)
    sync_round = args.repeats + 1 if cuda else -1
    for rep in range(args.repeats + 1 + cuda):
        for c in configs:
            method, ratio = c
            name, hp = parse_method_spec(method)  # "aim:pagerank=survivors+merge_mode=weighted"
            p = vtc.patch(model, name, ratio=ratio, **hp) if method != "none" else None
            if p is not None and rep == sync_round:
                p.sync_timing = True
            dt, kv[c], pk = run_once()
            if args.decode and rep and rep != sync_round:
                dec[c].append(decode_ms())
            if p is not None:
                st = p.stats[-1]
                kept[c] = st.tokens_after[0]
                layer_kept[c] = {j: v[0] for j, v in st.layer_tokens.items()}
                vtc.unpatch(model)
                if rep == sync_round or (rep and not cuda):
                    overhead[c].append(st.seconds)
            else:
                kept[c] = n_visual
            if rep and rep != sync_round:
                times[c].append(dt)
                peak[c].append(pk)
    base_t = statistics.median(times[("none", 1.0)])
    base_f = prefill_flops(model.config, n_visual, n_text, **geometry)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    shape, parts = {"llava": ("LLaVA-1.5", "ViT-L/14-336 + Llama"),
                    "llava-next": ("LLaVA-NeXT (672x672, 5 views)", "ViT-L/14-336 + Llama"),
                    "onevision-video": (f"LLaVA-OneVision video ({args.frames} frames x 196)",
                                        f"SigLIP-so400m {model.config.vision_config.num_hidden_layers}L + Qwen2"),
                    }[args.model]
    print(f"{shape}-shaped prefill: {parts} {args.llm_layers}L x {args.llm_width}, {dtype}, {dev}; "
          f"batch {args.batch}; median of {args.repeats}")
    print(f"{'method':8} {'ratio':>5} {'LLM-in':>6} {'prefill ms':>10} {'speedup':>8} {'ideal':>6} {'of ideal':>8} "
          f"{'overhead':>8} {'KV MiB':>7}" + (f" {'peak MiB':>8}" if cuda else "")
          + (f" {'decode ms/tok':>13}" if args.decode else ""))
    for c in configs:
        t = statistics.median(times[c])
        ideal = base_f / prefill_flops(model.config, kept[c], n_text, layer_kept.get(c), **geometry)
        sp = base_t / t
        ov = 100 * statistics.median(overhead[c]) / base_t if overhead[c] else 0.0
        row = (f"{c[0]:8} {c[1]:5.2f} {kept[c]:6d} {t * 1e3:10.1f} {sp:7.2f}x {ideal:5.2f}x {100 * sp / ideal:7.0f}% "
               f"{ov:7.2f}%")
        row += f" {kv[c]:7.1f}" + (f" {statistics.median(peak[c]):8.0f}" if cuda else "")
        print(row + (f" {statistics.median(dec[c]):13.2f}" if args.decode else ""))


if __name__ == "__main__":
    main()
