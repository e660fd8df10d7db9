"""Per-token cost of the CoRe^2 weak model as a fraction of one base-model decode step.

Measures, on random weights of the real shapes, at a mid-sequence position with a filled KV cache:
  base      one GPT decode step for B rows (cond only: forward_hidden at one position + head)
  weak      WeakModel.step_hidden + the frozen base head — the hidden-space design we ship
  weak_trunk WeakModel.step_hidden (without the head: the part a hidden-space mix could share with the base)
  logits_in the alternative design: Linear(V -> w) on the conditional logits, the same trunk, Linear(w -> V)
Also prints parameter counts (what a bandwidth-bound GPU step reads) for each.

    python benchmarks/bench_weak_cost.py --base GPT-B --weak W-2 W-4 --batch 1 8 --device cpu
Prints CSV rows and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn as nn

from llamagen_core2.config import GPTConfig
from llamagen_core2.core2.weak_model import WEAK_PRESETS, WeakModel
from llamagen_core2.decode.model import GPT, run_blocks


def timed(fn, repeats: int, sync) -> float:
    """Median seconds of `fn()` over `repeats` calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def measure(base: str, weak_presets, batch: int, device: str, dtype, repeats: int, image_size: int):
    torch.manual_seed(0)
    config = GPTConfig.from_preset(base, image_size=image_size)
    with torch.device(device):
        gpt = GPT(config).to(dtype).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    T, N, d, V = config.cls_token_num, config.num_image_tokens, config.dim, config.vocab_size
    pos = T + N // 2  # mid-sequence: half the cache filled
    cache = gpt.new_cache(batch, T + N)
    cond = torch.randint(0, config.num_classes, (batch,), device=device)
    gpt.forward_hidden(torch.randn(batch, pos, d, device=device, dtype=dtype), cache)  # fill the cache
    x = gpt.embed_tokens(torch.randint(0, V, (batch, 1), device=device))

    def base_step():
        return gpt.head(gpt.forward_hidden(x, cache, start=pos)[:, -1])

    rows = []
    t_base = timed(base_step, repeats, sync)
    base_params = sum(p.numel() for p in gpt.parameters()) - gpt.tok_embeddings.weight.numel()
    rows.append(dict(variant="base", preset=base, batch=batch, ms=t_base * 1e3, fraction=1.0, params=base_params))
    h_c = torch.randn(batch, d, device=device, dtype=dtype)
    for name in weak_presets:
        weak = WeakModel.for_base(gpt, name, fingerprint=False).to(device=device, dtype=dtype).eval()
        w = weak.config.dim
        weak_cache = weak.new_cache(batch)
        weak.prefill(cond, weak_cache)
        trunk_params = sum(p.numel() for p in weak.parameters()) - weak.cond_embedding.weight.numel()

        def weak_trunk(weak=weak, weak_cache=weak_cache):  # at a fixed position: a half-filled cache
            return weak.step_hidden(h_c, weak_cache, start=T + N // 2)

        def weak_step(weak_trunk=weak_trunk):
            return gpt.head(weak_trunk().to(dtype))

        t_weak, t_trunk = timed(weak_step, repeats, sync), timed(weak_trunk, repeats, sync)
        rows.append(dict(variant="weak", preset=name, batch=batch, ms=t_weak * 1e3, fraction=t_weak / t_base,
                         params=trunk_params + gpt.output.weight.numel()))
        rows.append(dict(variant="weak_trunk", preset=name, batch=batch, ms=t_trunk * 1e3,
                         fraction=t_trunk / t_base, params=trunk_params))
        # Logits-in alternative: read V-wide logits in, write V-wide logits out with its own matrices.
        with torch.device(device):
            lin_in, lin_out = nn.Linear(V, w, bias=False).to(dtype), nn.Linear(w, V, bias=False).to(dtype)
        logits = torch.randn(batch, V, device=device, dtype=dtype)

        def logits_in(weak=weak, weak_cache=weak_cache, lin_in=lin_in, lin_out=lin_out):
            out = run_blocks(weak.layers, weak.norm, weak.rope, lin_in(logits)[:, None], weak_cache, start=T + N // 2)
            return lin_out(out[:, 0]).float()

        t_logits = timed(logits_in, repeats, sync)
        rows.append(dict(variant="logits_in", preset=name, batch=batch, ms=t_logits * 1e3,
                         fraction=t_logits / t_base, params=trunk_params - 2 * w * d + 2 * V * w))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="GPT-B")
    p.add_argument("--weak", nargs="+", default=["W-2", "W-4"], choices=sorted(WEAK_PRESETS))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    print("variant,preset,batch,ms_per_step,fraction_of_base_step,params")
    for b in args.batch:
        for r in measure(args.base, args.weak, b, args.device, dtype, args.repeats, args.image_size):
            rows.append(r)
            print(f"{r['variant']},{r['preset']},{r['batch']},{r['ms']:.3f},{r['fraction']:.3f},{r['params']}")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(json.dumps(dict(rows=rows, device=args.device, device_name=device_name, dtype=args.dtype,
                          threads=torch.get_num_threads(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))))


if __name__ == "__main__":
    main()
