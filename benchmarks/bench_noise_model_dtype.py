"""How much running a CoRe^2 noise model in bf16 (the official sample_img.py does) moves its output vs fp32.

Random weights in the released layout (every parameter perturbed, LoRA B included, so no path is zero),
random prompt tokens summarised by the official recipe (prompt_summary.prompt_features), a random
conditional prediction. The fp32 model is the reference; the bf16 model is the same weights cast, fed
the same inputs (cast inside forward, as the official code casts them). Reported per config:
    rel_l2   ||out_bf16 - out_fp32|| / ||out_fp32||
    rel_max  max |out_bf16 - out_fp32| / max |out_fp32|
Configs: the sd35 / sdxl presets (full width and depth; 2 experts instead of 28 / 50 to fit CPU memory --
one expert is active per call, so the count does not change the forward) at a chosen latent side,
and the tiny model the diffusion tests use.

    OMP_NUM_THREADS=2 python benchmarks/bench_noise_model_dtype.py --side 32 --seeds 3
prints one CSV row per (config, seed) and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from llamagen_core2.diffusion.noise_model import NoiseModel, NoiseModelConfig, noise_model_preset
from llamagen_core2.diffusion.prompt_summary import prompt_features

# tokens per half, token width, pooled width per half: the official summaries' shapes
PROMPT_SHAPES = {"sd35": (333, 4096, 2048), "sdxl": (77, 2048, 1280)}


def tiny_config() -> NoiseModelConfig:
    return NoiseModelConfig(in_channels=4, num_layers=1, num_heads=2, head_dim=8, patch_size=2, sample_size=16,
                            pos_embed_max_size=8, text_dim=64, text_tokens=2 * (77 + 256), pooled_dim=128,
                            svd_rank=4, cond_hidden=8, lora_rank=2, num_experts=4)


def build(config: NoiseModelConfig, seed: int) -> NoiseModel:
    torch.manual_seed(seed)
    model = NoiseModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def measure(config: NoiseModelConfig, side: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    half_tokens = config.text_tokens // 2
    tokens = torch.randn(1, 2 * half_tokens, config.text_dim, generator=g)
    pooled = torch.randn(1, config.pooled_dim, generator=g)
    features = prompt_features(tokens, pooled, config.svd_rank)
    x = torch.randn(1, config.in_channels, side, side, generator=g)
    model = build(config, seed)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = model(x, *features, step=0, num_steps=1)
        t_fp32 = time.perf_counter() - t0
        model.to(torch.bfloat16)
        t0 = time.perf_counter()
        low = model(x, *features, step=0, num_steps=1).float()
        t_bf16 = time.perf_counter() - t0
    diff = low - ref
    return {"rel_l2": float(diff.norm() / ref.norm()), "rel_max": float(diff.abs().max() / ref.abs().max()),
            "fp32_s": round(t_fp32, 2), "bf16_s": round(t_bf16, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=32, help="latent side for the presets (official 1024px: 128)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--configs", default="tiny,sdxl,sd35")
    args = parser.parse_args()
    configs = {"tiny": (tiny_config(), 16),
               "sdxl": (noise_model_preset("sdxl", num_experts=2), args.side),
               "sd35": (noise_model_preset("sd35", num_experts=2), args.side)}
    print("config,side,seed,rel_l2,rel_max,fp32_s,bf16_s", flush=True)
    summary = {}
    for name in args.configs.split(","):
        config, side = configs[name]
        rows = []
        for seed in range(args.seeds):
            r = measure(config, side, seed)
            rows.append(r)
            print(f"{name},{side},{seed},{r['rel_l2']:.3e},{r['rel_max']:.3e},{r['fp32_s']},{r['bf16_s']}", flush=True)
        summary[name] = {"side": side, "max_rel_l2": max(r["rel_l2"] for r in rows),
                         "max_rel_max": max(r["rel_max"] for r in rows)}
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": summary}))


if __name__ == "__main__":
    main()
