"""A decoder that behaves like the LlamaGen reference, run on the weights of a llamagen_core2 GPT.

It is the "before" of every throughput number (docs/design.md#performance-model): benchmarks run it in the
same process as our engine. What it does, on purpose, the way LlamaGen's `autoregressive/models/generate.py` does:
  * its own KV cache preallocated at the full length S = T + N, and every step attends over all S keys with
    an explicit [S, S] causal mask row (`causal_mask[:, None, input_pos]`), not just the filled part;
  * CFG whenever any token needs it: always 2B rows ([cond; uncond]); logits split into halves and mixed with
    separate ops `uncond + (cond - uncond) * s`; past `cfg_interval` the uncond half is still computed and
    thrown away; cond mode (cfg_scale <= 1) runs B rows;
  * sampling: logits / max(temperature, 1e-5), top-k via `torch.topk` threshold, top-p via a full sort +
    softmax + cumsum, then softmax + `torch.multinomial` (host-synchronising); temperature 0 = argmax;
  * eager PyTorch, one Python loop iteration per token.
CoRe^2 modes (not in LlamaGen) are bolted on the same way: the weak model steps eagerly on the cond hidden
state, fast = weak logits, slow = weak + a (cfg - weak); as in LlamaGen, 2B rows run whenever cfg_scale > 1
(mode "cond" stands for LlamaGen with cfg_scale 1 and runs B rows).

Math is shared with the model (RMSNorm, SwiGLU, RoPE table, head), so with greedy sampling the tokens equal
those of `llamagen_core2.generate` (tests/test_static_decode.py cross-checks both).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from llamagen_core2.model import apply_rotary


def top_k_top_p_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """LlamaGen-style filtering of [B, V] logits (in place on a copy); removed entries become -inf."""
    logits = logits.clone()
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k)[0][..., -1, None]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(1, sorted_idx, remove)] = float("-inf")
    return logits


def sample_reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                     generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, V] -> [B]: LlamaGen's sample(): temperature, filter, softmax, multinomial (greedy at temperature 0)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits = top_k_top_p_filter(logits, top_k, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


class BaselineDecoder:
    def __init__(self, gpt):
        self.gpt = gpt
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def setup(self, rows: int, max_len: int, prefix_valid: Optional[torch.Tensor] = None) -> None:
        """Full-length caches [rows, H, S, D] per layer and the explicit causal mask [rows|1, S, S]."""
        c, w = self.gpt.config, self.gpt.output.weight
        shape = (rows, c.n_head, max_len, c.head_dim)
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(c.n_layer)]
        self.v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(c.n_layer)]
        mask = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=w.device))[None]
        if prefix_valid is not None:  # t2i: padded caption keys masked for every query, diagonal kept (LlamaGen)
            T = prefix_valid.shape[1]
            mask = mask.repeat(rows, 1, 1)
            mask[:, :, :T] &= prefix_valid.to(device=w.device, dtype=torch.bool)[:, None, :]
            mask |= torch.eye(max_len, dtype=torch.bool, device=w.device)[None]
        self.causal_mask = mask

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """x [R, L, d] at positions input_pos [L] -> final normed hidden [R, L, d]; attends over all S keys."""
        gpt = self.gpt
        c = gpt.config
        R, L, d = x.shape
        mask = self.causal_mask[:, None, input_pos]  # [R|1, 1, L, S]
        rope = gpt.rope[input_pos].float()
        h = x
        for i, layer in enumerate(gpt.layers):
            attn = layer.attention
            q, k, v = attn.wqkv(layer.attention_norm(h)).split(d, dim=-1)
            q = apply_rotary(q.view(R, L, c.n_head, c.head_dim), rope).transpose(1, 2)
            k = apply_rotary(k.view(R, L, c.n_head, c.head_dim), rope).transpose(1, 2)
            self.k[i][:, :, input_pos] = k
            self.v[i][:, :, input_pos] = v.view(R, L, c.n_head, c.head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask)
            h = h + attn.wo(out.transpose(1, 2).reshape(R, L, d))
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return gpt.norm(h)

    @torch.inference_mode()
    def generate(self, cond: torch.Tensor, *, num_tokens: Optional[int] = None, mode: str = "cfg",
                 cfg_scale: float = 4.0, cfg_interval: int = -1, temperature: float = 1.0, top_k: int = 2000,
                 top_p: float = 1.0, seed: Optional[int] = None, weak_model=None, w2s_scale: float = 1.0,
                 cond_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens [B, N] for conditions `cond` (class ids [B] or caption features [B, T, C])."""
        gpt = self.gpt
        device = gpt.output.weight.device
        B = gpt.check_condition(cond)
        T = gpt.config.cls_token_num
        N = gpt.config.num_image_tokens if num_tokens is None else int(num_tokens)
        generator = torch.Generator(device=device).manual_seed(0 if seed is None else int(seed))
        with_uncond = mode != "cond" and cfg_scale > 1.0  # LlamaGen: 2B rows whenever cfg_scale > 1
        cond = cond.to(device)
        prefix = gpt.condition_embeddings(cond)
        valid = None if cond_mask is None else cond_mask.to(device)
        if with_uncond:
            prefix = torch.cat([prefix, gpt.condition_embeddings(gpt.null_condition(B, cond))])
            valid = None if valid is None else torch.cat([valid, valid])
        rows = prefix.shape[0]
        self.setup(rows, T + N, valid)
        if mode in ("fast", "slow"):
            weak_model.start(gpt, cond, cond_mask=None if cond_mask is None else cond_mask.to(device))
        tokens = torch.zeros(B, N, dtype=torch.long, device=device)
        x, input_pos = prefix, torch.arange(T, device=device)
        for i in range(N):
            hidden = self.forward(x, input_pos)[:, -1]  # [rows, d]
            logits = gpt.head(hidden)  # [rows, V] fp32
            if with_uncond:
                cond_logits, uncond_logits = torch.split(logits, B, dim=0)
                use_cfg = cfg_interval == -1 or i <= cfg_interval + 1
                cfg = uncond_logits + (cond_logits - uncond_logits) * cfg_scale if use_cfg else cond_logits
            else:
                cond_logits = cfg = logits
            if mode in ("fast", "slow"):
                weak = weak_model.step(hidden[:B], i).float()
                mixed = weak if mode == "fast" else weak + (cfg - weak) * w2s_scale
            else:
                mixed = cfg if mode == "cfg" else cond_logits
            nxt = sample_reference(mixed, temperature, top_k, top_p, generator)
            tokens[:, i] = nxt
            x = gpt.embed_tokens(nxt.repeat(rows // B))[:, None]  # the same token feeds both halves
            input_pos = torch.tensor([T + i], device=device)
        return tokens
