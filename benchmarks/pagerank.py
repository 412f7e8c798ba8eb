"""AIM's PageRank score from q/k: full maps (four heads' (B, 4, L, L) maps at a time, as vtc did before) against
the streamed row blocks of ``vtc.core.scores.pagerank_importance_qk``, each in its own process (so the peak
resident memory is its own), on a causal mask with 1/8 of the tokens dropped as keys.

    python benchmarks/pagerank.py                         # 2,928 (LLaVA-NeXT) and 6,273 (32-frame video) tokens
    python benchmarks/pagerank.py --tokens 1000 --heads 28 --repeats 3

Prints seconds (best of ``--repeats``), the peak memory the call adds (MiB), the speedup, the largest relative
difference of the scores and whether the top quarter of tokens is the same set.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch


def _inputs(n: int, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, heads, n, 128, generator=g) * 2, torch.randn(1, heads, n, 128, generator=g)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None]
    allowed[:, :, n // 8: n // 4] = False  # tokens dropped at an earlier layer: masked as keys
    return q, k, allowed


def full_maps(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """The previous implementation: each chunk of heads builds its full (B, chunk, L, L) map."""
    from vtc.core.scores import pagerank_importance

    h = q.shape[1]
    sq = torch.zeros(q.shape[0], q.shape[2])
    for h0 in range(0, h, chunk):
        logits = torch.matmul(q[:, h0:h0 + chunk], k[:, h0:h0 + chunk].transpose(-1, -2)).mul_(128 ** -0.5)
        sq += pagerank_importance(logits, allowed, 0.1, 5, overwrite=True).pow(2) * logits.shape[1]
    return (sq / h).sqrt()


def _run(which: str, n: int, heads: int, repeats: int, out: "mp.Queue") -> None:
    from vtc.core.scores import pagerank_importance_qk

    q, k, allowed = _inputs(n, heads)
    fn = full_maps if which == "maps" else (lambda a, b, m: pagerank_importance_qk(a, b, 128 ** -0.5, m))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        score = fn(q, k, allowed)
        best = min(best, time.perf_counter() - t0)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    out.put((best, peak, score.numpy()))  # plain pickling: the child exits right after


def measure(which: str, n: int, heads: int, repeats: int) -> tuple[float, float, torch.Tensor]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(which, n, heads, repeats, queue))
    proc.start()
    best, peak, score = queue.get()
    proc.join()
    return best, peak, torch.from_numpy(score)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="2928,6273")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"PageRank score, {args.heads} heads x 128, fp32, CPU x{torch.get_num_threads()} threads; best of "
          f"{args.repeats}")
    print(f"{'tokens':>6} {'maps s':>7} {'MiB':>6} {'blocks s':>8} {'MiB':>6} {'speedup':>7} {'max rel diff':>12} "
          f"{'same top 1/4':>12}")
    for n in (int(x) for x in args.tokens.split(",")):
        t_m, mem_m, s_m = measure("maps", n, args.heads, args.repeats)
        t_b, mem_b, s_b = measure("blocks", n, args.heads, args.repeats)
        diff = ((s_m - s_b).abs().max() / s_m.abs().max()).item()
        top = n // 4
        same = torch.equal(s_m[0].topk(top).indices.sort().values, s_b[0].topk(top).indices.sort().values)
        print(f"{n:>6} {t_m:>7.2f} {mem_m:>6.0f} {t_b:>8.2f} {mem_b:>6.0f} {t_m / t_b:>6.2f}x {diff:>12.1e} "
              f"{str(same):>12}")


if __name__ == "__main__":
    main()
