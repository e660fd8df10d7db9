"""CoRe^2 diffusion noise (weak) model: predicts the CFG prediction from the conditional one.

Architecture (docs/design.md#diffusion-adapter; key layout follows the released `sd35_noise_model.pth` /
`sdxl_noise_model.pth`, read from the official `refine_model.py` + `lora.py`):

    input   pred_cond [B, C, H, W]      the base model's conditional prediction at step i
            prompt summary (prompt_summary.py): of the prompt-token matrix [T, E],
                            s [B, r, T] (the first r ROWS of U), v [B, r] (singular values),
                            d [B, r, E] (right singular vectors); and pooled [B, P]
    emb     = [s^T diag(v) d ; pooled']   [B, T+1, E]   (pooled' = pool_prompt_linear(pooled) if P != E)
    per-stage FiLM vectors:  pre{8,16,24}_linear(2) (E->128->SiLU->LN->width), mean over tokens
            trans_linear([s, v, d]) mean over the r rows;   last_linear -> AdaLN of norm_out
    skip    = pred_cond * a + b  with (a, b) [B, C, 1, 1] from skip_connection(skip_connection2(emb))
    x = PatchEmbed(pred_cond) * (1 + scale8 + trans) + shift8
    after block j: x = x * (1 + scale[j // 4] + trans) + shift[j // 4]   (stage 16 then 24)
    out = unpatchify(proj_out(AdaLN(x, last))) + skip  (+ pred_cond when add_cond_residual)

Every Linear carries MoE-LoRA experts (moe_lora.py), hard-routed by step index.
Official presets: sd35 (C=16, 8 blocks, width 1536, T=666=2x(77+256), E=4096, P=4096, LoRA rank
64 x 28 experts) and sdxl (C=4, 4 blocks, T=154=2x77, E=2048, P=2560, rank 48 x 50 experts).
How the official pipelines build the summary (which halves, in which order) is prompt_summary.py.

`add_cond_residual` (False for the official layout) adds pred_cond to the output so a freshly
initialised model of ours (zero proj_out) starts as "CFG ~ cond" and Reflect learns the correction.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..config import DictConfig
from ..errors import InvalidArgument, check_int, check_number
from ..optional import require
from .moe_lora import expert_index, set_active_expert, wrap_linears_with_moe_lora


@dataclass
class NoiseModelConfig(DictConfig):
    in_channels: int = 16
    num_layers: int = 8
    num_heads: int = 24
    head_dim: int = 64
    patch_size: int = 2
    sample_size: int = 128
    pos_embed_max_size: int = 192
    text_dim: int = 4096          # E: prompt-token feature width
    text_tokens: int = 666        # T: uncond + cond prompt tokens
    pooled_dim: int = 4096        # P: uncond + cond pooled width; projected to E when P != E
    svd_rank: int = 64            # r
    cond_hidden: int = 128
    lora_rank: int = 64
    num_experts: int = 28
    lora_alpha: float = 1.0
    add_cond_residual: bool = False
    base: str = ""                # the base pipeline this model was trained for (informational)
    cfg_scale: float = 0.0        # the CFG scale it was trained to predict (informational)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                check_int(f"noise-model {f.name}", value, minimum=1)
        check_number("noise-model lora_alpha", self.lora_alpha, above=0.0)
        check_number("noise-model cfg_scale", self.cfg_scale, minimum=0.0)

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


PRESETS = {
    "sd35": dict(in_channels=16, num_layers=8, text_dim=4096, text_tokens=666, pooled_dim=4096,
                 lora_rank=64, num_experts=28, base="sd35", cfg_scale=3.5),
    "sdxl": dict(in_channels=4, num_layers=4, text_dim=2048, text_tokens=154, pooled_dim=2560,
                 lora_rank=48, num_experts=50, base="sdxl", cfg_scale=5.5),
}


def noise_model_preset(name: str, **overrides) -> NoiseModelConfig:
    if name not in PRESETS:
        raise InvalidArgument(f"noise-model preset must be one of {sorted(PRESETS)}, got {name!r}")
    return NoiseModelConfig(**{**PRESETS[name], **overrides})


def _film_mlp(text_dim: int, hidden: int, width: int) -> nn.Sequential:
    # keys .0 (Linear), .2 (LayerNorm), .3 (Linear) as in the released weights
    return nn.Sequential(nn.Linear(text_dim, hidden), nn.SiLU(), nn.LayerNorm(hidden), nn.Linear(hidden, width))


class NoiseModel(nn.Module):
    def __init__(self, config: NoiseModelConfig):
        super().__init__()
        # diffusers building blocks give the exact parameter names of the released checkpoints
        require("diffusers", "NoiseModel")
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.embeddings import PatchEmbed
        from diffusers.models.normalization import AdaLayerNormContinuous

        c = self.config = config
        width, E = c.width, c.text_dim
        self.pos_embed = PatchEmbed(height=c.sample_size, width=c.sample_size, patch_size=c.patch_size,
                                    in_channels=c.in_channels, embed_dim=width,
                                    pos_embed_max_size=c.pos_embed_max_size)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(dim=width, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
                                  ff_inner_dim=2 * width)
            for _ in range(c.num_layers))
        self.norm_out = AdaLayerNormContinuous(width, width, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(width, c.patch_size * c.patch_size * c.in_channels, bias=True)
        for name in ("pre8_linear", "pre16_linear", "pre24_linear",
                     "pre8_linear2", "pre16_linear2", "pre24_linear2", "last_linear"):
            setattr(self, name, _film_mlp(E, c.cond_hidden, width))
        self.skip_connection2 = nn.Linear(E, 1, bias=False)
        self.skip_connection = nn.Linear(c.text_tokens + 1, 2 * c.in_channels, bias=False)
        self.trans_linear = nn.Linear(c.text_tokens + 1 + E, width, bias=False)
        self.pool_prompt_linear = nn.Linear(c.pooled_dim, E, bias=False) if c.pooled_dim != E else None
        # the released init: FiLM outputs and skip start at zero
        for lin in (self.skip_connection, self.trans_linear, self.pre8_linear[-1], self.pre16_linear[-1],
                    self.pre24_linear[-1], self.pre8_linear2[-1], self.pre16_linear2[-1], self.pre24_linear2[-1]):
            nn.init.zeros_(lin.weight)
        if c.add_cond_residual:
            nn.init.zeros_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)
        wrap_linears_with_moe_lora(self, c.lora_rank, c.num_experts, c.lora_alpha)

    def check_inputs(self, pred_cond: torch.Tensor, s, v, d, pooled) -> None:
        c = self.config
        B = pred_cond.shape[0]
        want = {"pred_cond": (B, c.in_channels), "s": (B, c.svd_rank, c.text_tokens), "v": (B, c.svd_rank),
                "d": (B, c.svd_rank, c.text_dim), "pooled": (B, c.pooled_dim)}
        got = {"pred_cond": tuple(pred_cond.shape[:2]), "s": tuple(s.shape), "v": tuple(v.shape),
               "d": tuple(d.shape), "pooled": tuple(pooled.shape)}
        for name in want:
            if got[name] != want[name]:
                raise InvalidArgument(
                    f"noise model input {name} must have shape {list(want[name])}"
                    f"{' + [H, W]' if name == 'pred_cond' else ''}, got {list(got[name])} "
                    f"(model built for base {c.base or '?'}: {c.text_tokens} prompt tokens of width {c.text_dim}, "
                    f"pooled width {c.pooled_dim}, {c.in_channels} channels)")
        H, W = pred_cond.shape[-2:]
        p, m = c.patch_size, c.pos_embed_max_size
        if pred_cond.dim() != 4 or H % p or W % p or H // p > m or W // p > m:
            raise InvalidArgument(
                f"pred_cond must be [B, C, H, W] with H, W multiples of patch_size {p} and at most {p * m}, "
                f"got {list(pred_cond.shape)}")

    def forward(self, pred_cond: torch.Tensor, s: torch.Tensor, v: torch.Tensor, d: torch.Tensor,
                pooled: torch.Tensor, *, step: int, num_steps: int) -> torch.Tensor:
        """pred_cond [B,C,H,W], s [B,r,T], v [B,r], d [B,r,E], pooled [B,P] -> predicted CFG [B,C,H,W]."""
        self.check_inputs(pred_cond, s, v, d, pooled)
        set_active_expert(self, expert_index(step, num_steps, self.config.num_experts))
        dtype = self.proj_out.linear.weight.dtype
        x_in = pred_cond.to(dtype)
        s, v, d, pooled = (t.to(dtype) for t in (s, v, d, pooled))

        # [B, T, E] = s^T diag(v) d as the released model forms it; with s = rows of U (the official
        # summary) this is not a reconstruction of the prompt tokens, but it is what the weights saw
        tokens = s.transpose(1, 2) @ (v.unsqueeze(-1) * d)
        pooled_tok = pooled[:, None, :]
        if self.pool_prompt_linear is not None:
            pooled_tok = self.pool_prompt_linear(pooled_tok)
        emb = torch.cat([tokens, pooled_tok], dim=1)                  # [B, T+1, E]

        scale8, scale16, scale24 = (getattr(self, f"pre{k}_linear2")(emb).mean(1) for k in (8, 16, 24))
        shift8, shift16, shift24 = (getattr(self, f"pre{k}_linear")(emb).mean(1) for k in (8, 16, 24))
        last = self.last_linear(emb).mean(1)
        trans = self.trans_linear(torch.cat([s, v.unsqueeze(-1), d], dim=2)).mean(1)   # [B, width]
        skip = self.skip_connection(self.skip_connection2(emb).transpose(1, 2)).transpose(1, 2)  # [B, 2C, 1]
        skip_scale, skip_shift = skip.chunk(2, dim=1)
        skip_out = x_in * skip_scale[..., None] + skip_shift[..., None]

        H, W = x_in.shape[-2:]
        x = self.pos_embed(x_in)                                      # [B, HW/p^2, width]
        x = x * (1 + scale8[:, None] + trans[:, None]) + shift8[:, None]
        stage_scales, stage_shifts = (scale16, scale24), (shift16, shift24)
        for j, block in enumerate(self.transformer_blocks):
            x = block(x)
            x = x * (1 + stage_scales[j // 4][:, None] + trans[:, None]) + stage_shifts[j // 4][:, None]
        x = self.proj_out(self.norm_out(x, last))

        p, C = self.config.patch_size, self.config.in_channels
        x = x.reshape(x.shape[0], H // p, W // p, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, H, W)
        out = x + skip_out
        if self.config.add_cond_residual:
            out = out + x_in
        return out.to(pred_cond.dtype)

