"""KV-cache memory, prefill and decode time: ZipVL against the plain cache and transformers' own quantized cache,
all measured in one process on the same LLaVA-1.5- or OneVision-video-shaped model (random weights).

    python benchmarks/kv_cache.py                                   # LLaVA-1.5 shape, CPU-sized LLM
    python benchmarks/kv_cache.py --model onevision-video --frames 8 --vision-layers 4
    python benchmarks/kv_cache.py --device cuda --llm-layers 32 --llm-width 4096 --dtype float16

Rows: the unpatched model (transformers' DynamicCache); transformers' ``QuantizedCache`` (optimum-quanto backend,
KIVI-style per-channel groups of 64 with a 128-token full-precision residual) at 4 and 2 bits; ``zipvl`` at each
``--taus`` (kv="mixed": important tokens at 4 bits, others at 2) and one ``kv="evict"`` row. Columns: tokens
found important (per layer, averaged; text included), KV bytes the prefill leaves (every tensor the cache holds,
statistics and residual buffers included) and their ratio to the same tokens in an fp16 cache, prefill time and
its speedup over the unpatched row, the FLOP-ideal speedup of sparse prefill for the chosen fractions, and
decode milliseconds per token (``--decode`` tokens after the first).
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
from flops import llama_flops, projector_flops, sparse_prefill_llama_flops, vit_flops  # noqa: E402
from prefill import build, prompt  # noqa: E402


def held_bytes(obj, seen: set | None = None) -> int:
    """Bytes of every distinct tensor reachable from a cache object (quanto's packed tensors by their parts)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(held_bytes(getattr(obj, n), seen) for n in names)
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.numel())
        if key in seen or obj.numel() == 0:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(held_bytes(x, seen) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and id(obj) not in seen:
        seen.add(id(obj))
        return sum(held_bytes(x, seen) for x in vars(obj).values())
    return 0


def layout_check(args, hk: int, hd: int, length: int, dtype: torch.dtype) -> None:
    """Bytes one layer of vtc's mixed-precision cache holds for this prompt at the important fractions ZipVL
    reported (28.6 %: 6.18x on LLaMA3-8B GSM8K; 52.8 %: LLaVA-1.5-7B at tau 0.975), against fp16: the storage
    alone, whatever fraction a model's attention makes tau choose."""
    from vtc.cache import MixedPrecisionLayer
    from vtc.sites import KVPolicy

    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, hk, length, hd, generator=g).to(dtype) for _ in range(2))
    for frac in (0.286, 0.528):
        layer = MixedPrecisionLayer(KVPolicy("mixed", 4, 2, 100))
        layer.update(k, v)
        important = torch.zeros(1, length, dtype=torch.bool)
        important[0, torch.randperm(length, generator=g)[: round(frac * length)]] = True
        layer.commit(important, torch.ones_like(important))
        print(f"  storage at {frac:.1%} important ({dtype}): {layer.nbytes / layer.dense_nbytes(2):.3f}x fp16 "
              f"({16 * layer.nbytes / layer.dense_nbytes(2):.2f} bits per value, statistics included)")


def toy_accuracy(rows: list[tuple[str, dict, dict]], bench: str) -> None:
    """Each row's cache on a bundled toy, generating greedily exactly as ``vtc eval`` does: MME perception and
    question accuracy on the toy LLaVA (ShapesMME test split), or Video-MME accuracy on the toy OneVision (the
    first 120 ShapesVideo test clips, 32 frames; its replies name the option's words before the letter, so the
    decode reads the cache)."""
    from vtc.cli import TEST_SEED, _cached_split
    from vtc.eval.runner import bench_score

    if bench == "mme":
        from vtc.eval.mme_data import load_mme, write_shapes_mme
        from vtc.eval.runner import evaluate_mme as evaluate
        from vtc.zoo.models import default_model as load

        data = _cached_split(f"shapes-mme-s{TEST_SEED}-n40-c112",
                             lambda d: write_shapes_mme(d, TEST_SEED, 40, canvas=112))
        recs, extra = load_mme(data / "mme.parquet"), {}
    else:
        from vtc.eval.videomme_data import load_videomme, write_shapes_video
        from vtc.eval.videomme_runner import evaluate_videomme as evaluate
        from vtc.zoo.models import default_video_model as load

        data = _cached_split(f"shapes-video-s{TEST_SEED}-n10", lambda d: write_shapes_video(d, TEST_SEED, 10))
        recs, extra = load_videomme(data), {"frames": 32}
    model, proc, label = load()
    print(f"\ntoy accuracy: {label}, {len(recs)} questions")
    print(f"{'cache':42} {'score':>14} {'accuracy':>8} {'KV bits':>7}")
    gen = model.generation_config
    for name, hyper, gen_kw in rows:
        saved = {k: getattr(gen, k, None) for k in gen_kw}
        for k, v in gen_kw.items():
            setattr(gen, k, v)
        try:
            res = evaluate(model, proc, recs, method="zipvl" if hyper else None, progress=False, **extra, **hyper)
        finally:
            for k, v in saved.items():
                setattr(gen, k, v)
        (score, acc, _), bits = bench_score(res, bench), res["compression"].get("kv_bits")
        print(f"{name:42} {score:14.1f} {100 * acc:7.1f}% {'' if bits is None else f'{bits:7.2f}'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="llava", choices=["llava", "onevision-video"])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--vision-layers", type=int, default=0)
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--llm-width", type=int, default=2048)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--taus", default="0.9,0.95,0.975")
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-quanto", action="store_true", help="skip transformers' QuantizedCache rows")
    ap.add_argument("--toy", choices=["mme", "videomme"],
                    help="also score every row on a bundled toy: LLaVA on ShapesMME, or OneVision on ShapesVideo")
    args = ap.parse_args()
    args.batch = 1
    if not args.no_quanto:
        try:
            import optimum.quanto  # noqa: F401
        except ImportError:
            raise SystemExit("transformers' QuantizedCache rows need optimum-quanto: pip install -e '.[bench]' "
                             "(or pass --no-quanto)")
    model, _ = build(args)
    dtype = getattr(torch, args.dtype)
    model = model.to(dtype)
    ids, inputs, n_visual, geo = prompt(args, dtype)
    text = model.config.text_config
    n_layers, hk, hd = text.num_hidden_layers, text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    length = ids.shape[1]
    dense_fp16 = 2 * n_layers * hk * length * hd * 2
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    rows: list[tuple[str, dict, dict]] = [("unpatched (DynamicCache)", {}, {})]
    if not args.no_quanto:
        for bits in (4, 2):
            rows.append((f"transformers QuantizedCache quanto {bits}-bit", {},
                         {"cache_implementation": "quantized", "cache_config": {"backend": "quanto", "nbits": bits}}))
    for tau in [float(t) for t in args.taus.split(",")]:
        rows.append((f"zipvl tau={tau:g} (4/2-bit)", {"tau": tau}, {}))
    rows.append((f"zipvl tau={float(args.taus.split(',')[-1]):g} kv=evict",
                 {"tau": float(args.taus.split(",")[-1]), "kv": "evict"}, {}))

    def prefill(gen_kw: dict):
        """One prefill through generate (so each row builds its own cache type): seconds, the cache, stats."""
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                                 return_dict_in_generate=True, **inputs, **gen_kw)
        sync()
        return time.perf_counter() - t0, output_cache(out)

    def decode_ms(gen_kw: dict) -> float:
        stamps: list[float] = []

        class Clock:
            def put(self, _):
                sync()
                stamps.append(time.perf_counter())

            def end(self):
                pass

        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.decode + 1,
                           min_new_tokens=args.decode + 1, do_sample=False, streamer=Clock(), **inputs, **gen_kw)
        return 1e3 * (stamps[-1] - stamps[1]) / args.decode

    results = {}
    for rep in range(args.repeats + 1):  # round-robin; round 0 warms up
        for name, hyper, gen_kw in rows:
            p = vtc.patch(model, "zipvl", **hyper) if hyper else None
            dt, cache = prefill(gen_kw)
            r = results.setdefault(name, {"t": [], "dec": []})
            if rep:
                r["t"].append(dt)
            r["bytes"] = held_bytes(cache)
            if p is not None:
                st = p.stats[-1]
                r["important"] = [v[0] / length for _, v in sorted(st.important_tokens.items())]
            if rep in (0, args.repeats) and args.decode:  # round 0 warms the decode path up (quanto builds kernels)
                ms = decode_ms(gen_kw)
                if rep:
                    r["dec"].append(ms)
            if p is not None:
                vtc.unpatch(model)
    v, t = model.config.vision_config, text
    tower = geo["crops"] * vit_flops(geo["patches"], v.num_hidden_layers, v.hidden_size, v.intermediate_size) + \
        projector_flops(geo["projected"], v.hidden_size, t.hidden_size)
    full = tower + llama_flops(length, n_layers, t.hidden_size, t.intermediate_size, t.num_attention_heads, hk)
    base_t = statistics.median(results[rows[0][0]]["t"])
    dev = torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()} threads"
    print(f"{'LLaVA-1.5' if args.model == 'llava' else f'OneVision video ({args.frames} frames)'}-shaped: "
          f"{length} tokens ({n_visual} visual), LLM {n_layers}L x {t.hidden_size} ({hk} KV heads x {hd}), "
          f"{args.dtype}, {dev}; median of {args.repeats}; fp16 KV of these tokens: {dense_fp16 / 2**20:.2f} MiB")
    print(f"{'cache':42} {'important':>9} {'KV MiB':>7} {'vs fp16':>7} {'prefill ms':>10} {'speedup':>7} "
          f"{'ideal':>6} {'decode ms/tok':>13}")
    for name, _, _ in rows:
        r = results[name]
        t_ms = statistics.median(r["t"]) * 1e3
        imp = r.get("important")
        if imp:
            n_probe = [2 * int(0.05 * length)] * n_layers
            sparse = tower + sparse_prefill_llama_flops(length, [round(f * length) for f in imp], n_probe,
                                                        t.hidden_size, t.intermediate_size, t.num_attention_heads, hk)
            ideal = f"{full / sparse:5.2f}x"
        else:
            ideal = ""
        print(f"{name:42} {'' if imp is None else f'{statistics.mean(imp):9.3f}':>9} {r['bytes'] / 2**20:7.2f} "
              f"{r['bytes'] / dense_fp16:6.3f}x {t_ms:10.1f} {base_t * 1e3 / t_ms:6.2f}x {ideal:>6} "
              f"{statistics.median(r['dec']) if r['dec'] else float('nan'):13.2f}")
    layout_check(args, hk, hd, length, dtype)
    if args.toy:
        toy_accuracy(rows, args.toy)


if __name__ == "__main__":
    main()
