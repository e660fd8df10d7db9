"""Text-to-image end to end: seconds per image for LlamaGen T2I with CoRe^2, generation + VQ decode.

The CoRe^2 paper reports 48.7 s per image for LlamaGen T2I in CoRe^2 slow mode (and 44.5 s for standard sampling)
with the eager reference code. This measures the same job on our engine: GPT-XL-t2i at 512 px (1024 image tokens
after the 120-token caption prefix), CoRe^2 slow (CFG 7.5 + W2S) or any other mode, batch 8 by default, then the
VQ-16 decode of every image (fp32, as LlamaGen runs it). Weights are random of the real shapes (timing does not
depend on them), and the caption features are random [B, 120, 2048] with random valid lengths standing in for
FLAN-T5-XL's output (T5 runs once per prompt and is not part of the per-image figure the paper reports either).

    python benchmarks/bench_t2i.py                                  # GPU: XL-t2i 512 px, b8, slow + cfg
    python benchmarks/bench_t2i.py --preset tiny --device cpu       # a smoke run (tiny random model)

One CSV row per mode (stdout) and a final JSON line; `warmup_s` is the first (untimed) call, which captures the
engine's CUDA graphs; the timed figure is the best of --repeats calls after it.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time

import torch

from llamagen_core2.config import GPTConfig, VQConfig
from llamagen_core2.core2.weak_model import WeakModel
from llamagen_core2.decode.engine import Engine
from llamagen_core2.decode.generate import generate
from llamagen_core2.decode.model import GPT
from llamagen_core2.encoders.vq import VQModel

FIELDS = ["preset", "device", "dtype", "batch", "tokens", "mode", "seconds_per_image", "generate_s", "decode_s",
          "images_per_s", "warmup_s", "peak_mem_MB", "paper_s_per_image"]
PAPER_SLOW_S_PER_IMAGE = 48.7  # CoRe^2 Fig. 1, LlamaGen T2I, CoRe^2 slow, their eager reference engine
TINY = dict(gpt=dict(dim=64, n_layer=2, n_head=4, vocab_size=97, caption_dim=24, cls_token_num=6, image_size=64,
                     downsample=16, multiple_of=32),
            vq=dict(ch=16, z_channels=16, codebook_size=97, codebook_embed_dim=8, norm_groups=8,
                    ch_mult=(1, 1, 2, 2, 4)),
            weak=dict(dim=32, n_head=4))


def build(preset: str, image_size: int, device, dtype):
    torch.manual_seed(0)
    if preset == "tiny":
        gpt_config, vq_config, weak_kw = GPTConfig.from_preset("GPT-B-t2i", **TINY["gpt"]), VQConfig(**TINY["vq"]), \
            TINY["weak"]
    else:
        gpt_config = GPTConfig.from_preset(f"GPT-{preset}-t2i", image_size=image_size)
        vq_config, weak_kw = VQConfig.from_preset("VQ-16", codebook_size=gpt_config.vocab_size), {}
    with torch.device(device):
        gpt = GPT(gpt_config).to(dtype).eval()
        vq = VQModel(vq_config).eval()  # fp32, as LlamaGen decodes
    weak = WeakModel.for_base(gpt, "W-2", fingerprint=False, **weak_kw).to(device=device, dtype=dtype).eval()
    return gpt, vq, weak


def captions(gpt: GPT, batch: int, device):
    """Random left-padded caption features [B, T, C] and their mask [B, T] (valid lengths 8..T)."""
    c = gpt.config
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(batch, c.cls_token_num, c.caption_dim, generator=g)
    lengths = torch.randint(min(8, c.cls_token_num), c.cls_token_num + 1, (batch,), generator=g)
    mask = torch.arange(c.cls_token_num)[None] >= (c.cls_token_num - lengths)[:, None]
    return (feats * mask[..., None]).to(device), mask.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="XL", choices=["B", "L", "XL", "XXL", "tiny"])
    p.add_argument("--image-size", type=int, default=512, choices=[256, 384, 512])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--modes", nargs="+", default=["slow", "cfg"], choices=["cond", "cfg", "fast", "slow"])
    p.add_argument("--cfg-scale", type=float, default=7.5, help="LlamaGen sample_t2i.py's default")
    p.add_argument("--w2s-scale", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=1000, help="LlamaGen sample_t2i.py's default")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    gpt, vq, weak = build(args.preset, args.image_size, device, dtype)
    engine = Engine(gpt)
    feats, mask = captions(gpt, args.batch, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"
    writer = csv.DictWriter(sys.stdout, FIELDS)
    writer.writeheader()
    rows = []
    with torch.inference_mode():
        for mode in args.modes:
            def call(seed):
                sync(device)
                t0 = time.perf_counter()
                tokens = generate(gpt, feats, cond_mask=mask, mode=mode, cfg_scale=args.cfg_scale,
                                  w2s_scale=args.w2s_scale, top_k=args.top_k, seed=seed, weak_model=weak,
                                  engine=engine)
                sync(device)
                t1 = time.perf_counter()
                images = vq.decode_codes(tokens)
                sync(device)
                assert images.shape[0] == args.batch
                return t1 - t0, time.perf_counter() - t1

            t0 = time.perf_counter()
            call(0)  # warm-up: CUDA-graph capture, kernel selection
            warmup_s = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            gen_s, dec_s = min((call(1 + r) for r in range(args.repeats)), key=sum)
            total = gen_s + dec_s
            row = dict(preset=f"GPT-{args.preset}-t2i", device=device_name, dtype=str(dtype).replace("torch.", ""),
                       batch=args.batch, tokens=gpt.config.num_image_tokens, mode=mode,
                       seconds_per_image=round(total / args.batch, 4), generate_s=round(gen_s, 4),
                       decode_s=round(dec_s, 4), images_per_s=round(args.batch / total, 3),
                       warmup_s=round(warmup_s, 3),
                       peak_mem_MB=round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
                       if device.type == "cuda" else "",
                       paper_s_per_image=PAPER_SLOW_S_PER_IMAGE if mode == "slow" else "")
            writer.writerow(row)
            sys.stdout.flush()
            rows.append(row)
    print(json.dumps(dict(device=device_name, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                          command=" ".join(["python", "benchmarks/bench_t2i.py", *(argv or sys.argv[1:])]),
                          rows=rows)))


if __name__ == "__main__":
    main()
