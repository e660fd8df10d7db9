"""How many candidate rounds the sampler's select needs, replayed on the host (CPU, no GPU needed).

The fused select (docs/sampling.md#the-select-path) tests the unfiltered race winner first; a rejected
candidate is followed by the race winner above its key, and after `--cap` rejections the row takes the bounded
exact path. Its cost per row is therefore one pass plus one per rejection (plus the first search pass). This
script replays that sequence with the torch reference's race (the same Philox noise) on synthetic CFG logits
(cond, uncond ~ N(0, scale^2), cfg 4: scale 3 is bench_kernels.py's input) and reports, per top-k / top-p
setting: the share of rows the first test accepts, the mean and largest number of rejections, and the share
that would reach the exact path. top-p masses are float64 here (the kernel sums fp32; the counts are not
affected beyond rounding at the cut); for top-k + top-p the bracket refinements are not counted.

    python benchmarks/select_rounds.py                     # scales 3, 1, 0.3; V = 16384; 512 rows
"""
from __future__ import annotations

import argparse
import json

import torch

from llamagen_core2.guidance import mix_guidance
from llamagen_core2.guidance.philox import race_uniforms


def rounds(x: torch.Tensor, score: torch.Tensor, top_k: int, top_p: float, limit: int = 64) -> torch.Tensor:
    """Rejections before a candidate is accepted, per row (x, score: [B, V] scaled logits and race scores)."""
    batch, vocab = x.shape
    e = torch.exp(x.double() - x.double().max(dim=1, keepdim=True).values)
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k, dim=1).values[:, -1:]
        e = torch.where(x >= kth, e, torch.zeros_like(e))
    total = e.sum(dim=1)
    floor = torch.full((batch, 1), float("-inf"))
    count = torch.zeros(batch, dtype=torch.long)
    pending = torch.ones(batch, dtype=torch.bool)
    for _ in range(limit):
        cand = torch.where(x > floor, score, torch.full_like(score, float("-inf"))).argmax(dim=1, keepdim=True)
        xc = x.gather(1, cand)
        kept = torch.ones(batch, dtype=torch.bool)
        if 0 < top_k < vocab:
            kept &= (x > xc).sum(dim=1) < top_k
        if top_p < 1.0:
            kept &= torch.where(x > xc, e, torch.zeros_like(e)).sum(dim=1) <= top_p * total
        count += (pending & ~kept).long()
        pending &= ~kept
        floor = torch.where(pending[:, None], xc, floor)
        if not bool(pending.any()):
            break
    return count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="3,1,0.3")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cap", type=int, default=8, help="rejections before the exact path (launch_config default)")
    args = ap.parse_args(argv)
    print("scale,top_k,top_p,first_test_accepts,mean_rejections,max_rejections,exact_path_share")
    out = []
    for scale in (float(s) for s in args.scales.split(",")):
        g = torch.Generator().manual_seed(0)
        c = torch.randn(args.rows, args.vocab, generator=g) * scale
        u = torch.randn(args.rows, args.vocab, generator=g) * scale
        x = mix_guidance(c, u, mode="cfg", cfg_scale=4.0)
        keys = torch.arange(args.rows) * 7919 + 1
        score = x - torch.log(-torch.log(race_uniforms(keys, 0, args.rows, args.vocab)))
        for top_k, top_p in ((2000, 1.0), (0, 0.9), (2000, 0.9), (50, 1.0)):
            r = rounds(x, score, top_k, top_p).float()
            row = dict(scale=scale, top_k=top_k, top_p=top_p, first_test_accepts=round(float((r == 0).float().mean()), 3),
                       mean_rejections=round(float(r.mean()), 2), max_rejections=int(r.max()),
                       exact_path_share=round(float((r >= args.cap).float().mean()), 3))
            out.append(row)
            print(",".join(str(v) for v in row.values()), flush=True)
    print(json.dumps(dict(vocab=args.vocab, rows=args.rows, cap=args.cap, rows_out=out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
