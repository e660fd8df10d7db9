"""LlamaGen-compatible GPT: a Llama decoder over [condition prefix; VQ image tokens], with caller-owned KV caches.

Contract (LlamaGen compatibility facts: docs/design.md#llamagen-compatibility):
  * State-dict keys are LlamaGen's, unchanged (`tok_embeddings`, `cls_embedding.*`, `layers.{i}.attention.wqkv`,
    `...wo`, `...feed_forward.w1/w2/w3`, `...attention_norm`, `...ffn_norm`, `norm`, `output`), so official
    checkpoints load with `GPT.from_pretrained`. The KV cache and RoPE tables are NOT in the state dict; w1 and w3
    are stored as one [2F, d] parameter (one GEMM) but saved and loaded under their LlamaGen keys.
  * Sequence layout: positions 0..T-1 hold the condition prefix (T = cls_token_num: 1 class embedding, or 120
    projected caption features), image token i sits at position T + i. 2D RoPE with T rows of zeros in front
    (q and k at prefix positions are zero vectors — LlamaGen's quirk, replicated on purpose).
  * `run_blocks` is the only implementation of the transformer block stack, for GPT and the weak model alike:
    training (no cache), prefill / catch-up prefill at host positions, and the decode step at a device position
    (CUDA-graph capturable). The non-GEMM ops go through `block_ops` (torch reference or fused Triton kernels,
    `backend` chosen once by the caller); at a device position the caller may also pass `decode_ops`, the fused
    decode-layer kernels it chose for that shape (decode_ops.py: add+RMSNorm+QKV+RoPE+KV write, skinny split-K
    GEMMs for wo and W2, add+RMSNorm+W1|W3+SwiGLU). `gpt.forward_hidden(x, cache, ...)` returns the final *normed* hidden
    state [R, L, d]; `head(h)` -> fp32 logits. The cache is a `KVCache` the caller owns (kv_cache.py,
    `gpt.new_cache`).
  * `logits(cond, tokens)` -> fp32 [B, N, V], teacher-forced full recompute without the cache (logit i predicts
    token i); it is the oracle the cached decode is tested against and the training forward.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import GPT_PRESETS, GPTConfig, check_gpt_preset
from ..errors import CheckpointError, InvalidArgument, check_has_values, check_token_ids
from ..io.checkpoint import read_config, read_state_dict, save_pretrained as save_state_pretrained, validate_state_dict
from . import block_ops
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    """LlamaGen's RMSNorm (normalise in fp32, cast back, then scale); the math is `block_ops.add_rmsnorm`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_ops.add_rmsnorm(x, None, self.weight, self.eps, backend="torch")[0]


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases.

    w1 and w3 live in one [2F, d] parameter `w13` (rows w1 | w3) so that both projections are one GEMM; state
    dicts keep LlamaGen's separate `w1.weight` / `w3.weight` keys (hooks split on save and join on load)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.hidden_dim = config.ffn_dim
        self.w13 = nn.Parameter(torch.empty(2 * config.ffn_dim, config.dim))
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)
        nn.init.kaiming_uniform_(self.w13, a=math.sqrt(5))  # nn.Linear's default, as w1 and w3 had
        self._register_state_dict_hook(_split_w13)
        self._register_load_state_dict_pre_hook(_join_w13, with_module=True)

    def forward(self, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        return self.w2(self.up(x, backend))

    def up(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        """silu(w1 x) * w3 x [..., F]: one [w1; w3] GEMM, then SwiGLU."""
        return block_ops.swiglu(F.linear(x, self.w13), backend=backend)

    def down(self, hidden: torch.Tensor, ctx: "ForwardContext") -> torch.Tensor:
        """W2 of the SwiGLU output [..., F] -> [..., d]: the skinny split-K GEMM where the decode ops chose it."""
        if ctx.ops is not None and ctx.ops.w2:
            return block_ops.skinny_linear(hidden, self.w2.weight, backend=ctx.backend, workspace=ctx.ops.workspace)
        return self.w2(hidden)


def _split_w13(module: FeedForward, state: dict, prefix: str, local_metadata) -> None:
    w13 = state.pop(prefix + "w13")
    state[prefix + "w1.weight"], state[prefix + "w3.weight"] = w13.split(module.hidden_dim)


def _join_w13(module: FeedForward, state: dict, prefix: str, local_metadata, strict, missing_keys,
              unexpected_keys, error_msgs) -> None:
    w1, w3 = prefix + "w1.weight", prefix + "w3.weight"
    if w1 in state and w3 in state:
        state[prefix + "w13"] = torch.cat([state.pop(w1), state.pop(w3)])


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """LlamaGen's init: normal(0, std) for every linear / embedding weight, in module order (w13 counts as w1
    then w3, which draws the same numbers as two separate [F, d] weights)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, FeedForward):
            nn.init.normal_(m.w13, std=std)


class ForwardContext:
    """What every block of one forward shares: where the inputs sit, how attention reads the cache, and which
    fused decode-layer kernels run (`ops`: a decode_ops.DecodeOps, or None for the unfused ops)."""

    def __init__(self, rope: torch.Tensor, positions: torch.Tensor, max_end: int, row_start: int,
                 key_valid: Optional[torch.Tensor], fused_decode: bool, backend: str, mask: Optional[torch.Tensor],
                 ops=None):
        self.rope, self.positions, self.max_end, self.row_start = rope, positions, max_end, row_start
        self.key_valid, self.fused_decode, self.backend, self.mask = key_valid, fused_decode, backend, mask
        self.ops = ops


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=False)  # rows q | k | v, heads contiguous
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, kv: Optional[tuple]) -> torch.Tensor:
        """x [R, L, d]; kv = (cache_k, cache_v) of this layer [rows_total, H, S, D], or None (no cache)."""
        R, L, d = x.shape
        qkv = self.wqkv(x)
        if kv is None:  # training / the full-recompute oracle: attend over x itself
            q, k, v = qkv.view(R, L, 3, self.n_head, self.head_dim).unbind(2)
            table = ctx.rope.index_select(0, ctx.positions)
            q, k = block_ops.apply_rotary(q, table).transpose(1, 2), block_ops.apply_rotary(k, table).transpose(1, 2)
            v = v.transpose(1, 2)
        else:
            cache_k, cache_v = kv
            q = block_ops.rope_kv_write(qkv, ctx.rope, ctx.positions, cache_k, cache_v, ctx.row_start,
                                        backend=ctx.backend)
            return self.attend(q, ctx, kv)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)
        return self.wo(out.transpose(1, 2).reshape(R, L, d))

    def attend(self, q: torch.Tensor, ctx: ForwardContext, kv: tuple) -> torch.Tensor:
        """Rotated q [R, H, L, D] whose K/V are in the cache already -> out projection of the attention [R, L, d]."""
        R, H, L, D = q.shape
        cache_k, cache_v = kv
        if ctx.fused_decode:  # walks only the filled keys 0..position, read on the device
            out = block_ops.decode_attention(q, cache_k, cache_v, ctx.row_start, ctx.positions, ctx.key_valid,
                                             ctx.max_end, backend=ctx.backend)
        else:
            rows = slice(ctx.row_start, ctx.row_start + R)
            out = F.scaled_dot_product_attention(q, cache_k[rows, :, :ctx.max_end], cache_v[rows, :, :ctx.max_end],
                                                 attn_mask=ctx.mask)
        out = out.transpose(1, 2).reshape(R, L, H * D)  # a view for one query per row
        if ctx.ops is not None and ctx.ops.wo:
            return block_ops.skinny_linear(out, self.wo.weight, backend=ctx.backend, workspace=ctx.ops.workspace)
        return self.wo(out)


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, h: torch.Tensor, pending: Optional[torch.Tensor], ctx: ForwardContext, kv: Optional[tuple]):
        """h [R, L, d] residual stream, pending = the previous block's FFN output not yet added to it (None in the
        first block) -> (h, this block's FFN output). LlamaGen: h = x + attn(norm(x)); out = h + ffn(norm(h));
        the residual adds are fused into the next norm (float addition commutes, so the sums are the same)."""
        x, residual = (h, None) if pending is None else (pending, h)
        ops = ctx.ops
        if ops is not None and ops.norm_qkv_rope:  # add+RMSNorm, wqkv, RoPE and the K/V write in one launch
            q, h = block_ops.norm_qkv_rope(x, residual, self.attention_norm.weight, self.attention_norm.eps,
                                           self.attention.wqkv.weight, ctx.rope, ctx.positions, kv[0], kv[1],
                                           ctx.row_start, backend=ctx.backend, workspace=ops.workspace)
            attn = self.attention.attend(q, ctx, kv)
        else:
            normed, h = block_ops.add_rmsnorm(x, residual, self.attention_norm.weight, self.attention_norm.eps,
                                              backend=ctx.backend)
            attn = self.attention(normed, ctx, kv)
        if ops is not None and ops.norm_w13_swiglu:  # add+RMSNorm, W1|W3 and SwiGLU in one launch
            hidden, h = block_ops.norm_w13_swiglu(attn, h, self.ffn_norm.weight, self.ffn_norm.eps,
                                                  self.feed_forward.w13, backend=ctx.backend,
                                                  workspace=ops.workspace)
        else:
            normed, h = block_ops.add_rmsnorm(attn, h, self.ffn_norm.weight, self.ffn_norm.eps, backend=ctx.backend)
            hidden = self.feed_forward.up(normed, ctx.backend)
        return h, self.feed_forward.down(hidden, ctx)


def run_blocks(layers: nn.ModuleList, final_norm: RMSNorm, rope: torch.Tensor, x: torch.Tensor,
               cache: Optional[KVCache] = None, *, start: int = 0, position: Optional[torch.Tensor] = None,
               row_start: int = 0, max_end: Optional[int] = None, prefix_valid: Optional[torch.Tensor] = None,
               backend: str = "torch", decode_ops=None) -> torch.Tensor:
    """The one forward of a LlamaGen-style trunk (GPT and the CoRe^2 weak model): x [R, L, w] -> final normed
    hidden [R, L, w]. Three uses:
      * no cache (training, the full-recompute oracle): positions 0..L-1, causal; prefix_valid [R, T] hides
        padded t2i caption keys;
      * prefill / catch-up with a cache: positions start..start+L-1 (host ints), K/V written into cache rows
        row_start.., keys read up to max_end (default start + L), cache.key_valid hides padded prefix keys;
      * decode step with a cache: L == 1 at `position` (a device LongTensor [1], never read on the host, so the
        step can be captured in a CUDA graph); max_end is a host bound >= position + 1. With the Triton backend
        the decode-attention kernel walks only keys 0..position; the torch reference reads [:max_end] masked.
        L > 1 at `position` is a window at positions position..position+L-1 (Jacobi decoding, docs/decoding.md):
        attention through SDPA over [:max_end] with the causal mask built on the device (graph-capturable).
        `decode_ops` (a decode_ops.DecodeOps the caller chose for this shape, Triton backend only): the fused
        decode-layer kernels it names replace their groups of ops (5 launches per layer with all four, 6 when the
        decode attention splits; docs/decode_kernels.md); None: the unfused ops.
    """
    if decode_ops is not None and (position is None or cache is None or backend != "triton"):
        raise InvalidArgument(f"decode_ops (the fused decode-layer kernels) serve a decode step or window at a device "
                              f"position with a KV cache and backend='triton', got position="
                              f"{'None' if position is None else 'a tensor'}, cache="
                              f"{'None' if cache is None else 'a KVCache'}, backend={backend!r}")
    R, L, _ = x.shape
    if position is not None:
        positions = position if L == 1 else position + torch.arange(L, device=x.device)
    else:
        positions = torch.arange(start, start + L, device=x.device)
    if cache is None:
        end = L
        key_valid = None
        if prefix_valid is not None:
            key_valid = torch.ones(R, L, dtype=torch.bool, device=x.device)
            T = min(prefix_valid.shape[1], L)
            key_valid[:, :T] = prefix_valid[:, :T].to(device=x.device, dtype=torch.bool)
    else:
        end = max_end if max_end is not None else start + L
        key_valid = None if cache.key_valid is None else cache.key_valid[row_start:row_start + R]
    fused_decode = position is not None and L == 1 and backend != "torch"
    mask = None
    if not fused_decode and not (position is None and L == 1 and key_valid is None and end == start + 1):
        mask = block_ops.attention_mask(positions, end, key_valid)
    ctx = ForwardContext(rope, positions, end, row_start, None if cache is None else cache.key_valid, fused_decode,
                         backend, mask, decode_ops)
    h, pending = x, None
    for i, layer in enumerate(layers):
        h, pending = layer(h, pending, ctx, None if cache is None else (cache.k[i], cache.v[i]))
    return block_ops.add_rmsnorm(pending, h, final_norm.weight, final_norm.eps, backend=backend)[0]


def rope_table_2d(grid_size: int, head_dim: int, cls_token_num: int, base: float = 10000.0) -> torch.Tensor:
    """-> [cls_token_num + grid_size**2, head_dim/2, 2] (cos, sin); prefix rows are zeros (not identity)."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # [head_dim/4]
    angles = torch.outer(torch.arange(grid_size, dtype=torch.float32), freqs)  # [G, head_dim/4]
    grid = torch.cat([angles[:, None, :].expand(-1, grid_size, -1),   # row angle r*w
                      angles[None, :, :].expand(grid_size, -1, -1)],  # column angle c*w
                     dim=-1)  # [G, G, head_dim/2]
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])


def keep_rope_fp32(module: nn.Module, config: GPTConfig) -> None:
    """Rebuild `module.rope` in fp32 after .to(bf16)/.half() cast it: LlamaGen rotates with an fp32 table."""
    if module.rope.dtype != torch.float32 and module.rope.device.type != "meta":
        c = config
        module.rope = rope_table_2d(c.grid_size, c.head_dim, c.cls_token_num, c.rope_base).to(module.rope.device)


class LabelEmbedder(nn.Module):
    """c2i prefix: one embedding per class id; id num_classes is the null class used for CFG."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # [B] -> [B, 1, d]
        return self.embedding_table(labels)[:, None, :]


class CaptionMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """t2i prefix: T5 features [B, T, caption_dim] -> [B, T, d]; `uncond_embedding` is the null caption."""

    def __init__(self, caption_dim: int, dim: int, token_num: int):
        super().__init__()
        self.cap_proj = CaptionMLP(caption_dim, dim)
        # A buffer in LlamaGen (saved in checkpoints, not trained by the optimizer); must be loaded.
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim ** 0.5)

    def forward(self, captions: torch.Tensor) -> torch.Tensor:
        return self.cap_proj(captions.to(self.cap_proj.fc1.weight.dtype))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        c = config
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        if c.model_type == "c2i":
            self.cls_embedding = LabelEmbedder(c.num_classes, c.dim)
        else:
            self.cls_embedding = CaptionEmbedder(c.caption_dim, c.dim, c.cls_token_num)
        self.layers = nn.ModuleList(TransformerBlock(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.register_buffer("rope", rope_table_2d(c.grid_size, c.head_dim, c.cls_token_num, c.rope_base),
                             persistent=False)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        keep_rope_fp32(self, self.config)
        return out

    # ------------------------------------------------------------------ conditions
    def check_condition(self, cond: torch.Tensor, *, cond_mask: Optional[torch.Tensor] = None,
                        allow_null: bool = False) -> int:
        """Validate a batch of conditions (and a t2i caption mask); returns B. c2i: LongTensor [B] ids; t2i: float
        [B, T, caption_dim] + optional bool (or 0/1) cond_mask [B, T]. The one check of generate() and logits()."""
        c = self.config
        if c.model_type == "c2i":
            if not isinstance(cond, torch.Tensor) or cond.ndim != 1 or cond.dtype not in (torch.int32, torch.int64):
                raise InvalidArgument(f"cond for a class-conditional model must be an integer tensor [B] of class ids, "
                                      f"got {getattr(cond, 'dtype', type(cond).__name__)} {list(getattr(cond, 'shape', []))}")
            check_has_values("cond", cond)
            top = c.num_classes if allow_null else c.num_classes - 1
            if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) > top):
                raise InvalidArgument(f"class ids must be in [0, {top}], got values in "
                                      f"[{int(cond.min())}, {int(cond.max())}]")
        else:
            want = (c.cls_token_num, c.caption_dim)
            if not isinstance(cond, torch.Tensor) or cond.ndim != 3 or tuple(cond.shape[1:]) != want:
                raise InvalidArgument(f"cond for a text-conditional model must be caption features [B, {want[0]}, "
                                      f"{want[1]}], got {list(getattr(cond, 'shape', []))}")
            check_has_values("cond", cond)
        if cond.shape[0] == 0:
            raise InvalidArgument("cond must hold at least one condition (batch size >= 1)")
        B = cond.shape[0]
        if cond_mask is not None:
            if c.model_type != "t2i":
                raise InvalidArgument("cond_mask is only meaningful for text-conditional (t2i) models")
            if not isinstance(cond_mask, torch.Tensor) or tuple(cond_mask.shape) != (B, c.cls_token_num):
                raise InvalidArgument(f"cond_mask must be a tensor [B={B}, {c.cls_token_num}], got "
                                      f"{list(getattr(cond_mask, 'shape', [])) or type(cond_mask).__name__}")
            check_has_values("cond_mask", cond_mask)
            if cond_mask.is_floating_point() or cond_mask.is_complex() or (
                    cond_mask.dtype != torch.bool and not bool(((cond_mask == 0) | (cond_mask == 1)).all())):
                raise InvalidArgument(f"cond_mask must be bool (or 0/1 integers), got {cond_mask.dtype}")
        return B

    def condition_embeddings(self, cond: torch.Tensor) -> torch.Tensor:
        """cond -> prefix embeddings [B, T, d]."""
        return self.cls_embedding(cond)

    def null_condition(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """The unconditional counterpart of `like` for CFG: null class id or the checkpoint's uncond_embedding."""
        if self.config.model_type == "c2i":
            return torch.full((batch,), self.config.num_classes, dtype=like.dtype, device=like.device)
        return self.cls_embedding.uncond_embedding.to(like.dtype)[None].expand(batch, -1, -1)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)

    # ------------------------------------------------------------------ forward
    def new_cache(self, rows: int, max_len: Optional[int] = None, dtype=None, device=None) -> KVCache:
        """A KV cache for `rows` sequences of up to max_len positions (default: the whole sequence), in the
        weights' dtype and device unless given. The caller owns it (generate()'s Engine, a benchmark, a test)."""
        weight = self.output.weight
        return KVCache.for_config(self.config, rows, max_len, dtype=dtype or weight.dtype,
                                  device=device or weight.device)

    def forward_hidden(self, x: torch.Tensor, cache: Optional[KVCache] = None, *, start: int = 0,
                       position: Optional[torch.Tensor] = None, row_start: int = 0, max_end: Optional[int] = None,
                       prefix_valid: Optional[torch.Tensor] = None, backend: str = "torch",
                       decode_ops=None) -> torch.Tensor:
        """x [R, L, d] embeddings -> final normed hidden [R, L, d]; see `run_blocks` for the three uses
        (no cache / prefill at host positions start.. / decode step or window at a device position) and
        `decode_ops` (the fused decode-layer kernels the caller chose for this shape)."""
        R, L, _ = x.shape
        if cache is None and (start != 0 or position is not None):
            raise InvalidArgument("forward_hidden without a KV cache runs positions 0..L-1 (start=0, no position)")
        if position is not None and max_end is None:
            raise InvalidArgument("a decode step (or window) at a device position needs max_end, a host bound on the "
                                  "keys it reads")
        end = max_end if max_end is not None else start + L
        if cache is not None and (row_start + R > cache.rows or end > cache.max_len or start + L > end):
            raise InvalidArgument(f"cache of {cache.rows} rows x {cache.max_len} positions cannot hold rows "
                                  f"{row_start}:{row_start + R} at positions {start}:{start + L} (reading to {end})")
        if end > self.rope.shape[0] or start + L > self.rope.shape[0]:
            raise InvalidArgument(f"positions up to {max(end, start + L)} exceed the model's {self.rope.shape[0]} "
                                  f"positions")
        return run_blocks(self.layers, self.norm, self.rope, x, cache, start=start, position=position,
                          row_start=row_start, max_end=max_end, prefix_valid=prefix_valid, backend=backend,
                          decode_ops=decode_ops)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final normed hidden [..., d] -> fp32 logits [..., V] (linear, no bias, so CFG commutes with it)."""
        return self.output(hidden).float()

    def logits(self, cond: torch.Tensor, tokens: torch.Tensor,
               cond_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced fp32 logits [B, N, V]; logit i predicts image token i (no KV cache involved)."""
        B = self.check_condition(cond, cond_mask=cond_mask, allow_null=True)
        check_token_ids("tokens", tokens, self.config.vocab_size)
        if tokens.ndim != 2 or tokens.shape[0] != B:
            raise InvalidArgument(f"tokens must be [B={B}, N], got {list(tokens.shape)}")
        N = tokens.shape[1]
        if N < 1 or N > self.config.num_image_tokens:
            raise InvalidArgument(f"tokens must hold 1..{self.config.num_image_tokens} image tokens, got {N}")
        T = self.config.cls_token_num
        x = torch.cat([self.condition_embeddings(cond), self.embed_tokens(tokens[:, :-1])], dim=1)
        return self.head(self.forward_hidden(x, prefix_valid=cond_mask)[:, T - 1:])

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, preset: Optional[str] = None, *, device=None, dtype=None,
                        filename: Optional[str] = None, revision: Optional[str] = None, cache_dir=None,
                        local_files_only: Optional[bool] = None, **overrides) -> "GPT":
        """Load an official LlamaGen `.pt` (any wrapper), a `.safetensors` file or a converted directory.

        `path` is a local path or a Hub repo id (`org/repo`, + `filename=` for single-file releases such as
        FoundationVision/LlamaGen's `c2i_B_256.pt`), resolved by `hub.resolve` (HF cache, HF_HUB_OFFLINE).
        A directory with config.json uses it (plus `overrides`). Otherwise the config is
        `GPTConfig.from_preset(preset, **overrides)`, or, with no preset, inferred from the tensor shapes
        (dim, layers, vocab, classes, caption width) with n_head taken from the matching preset and the
        image size from a `_256`-style file-name suffix.
        """
        from ..io.hub import resolve

        if preset is not None:
            check_gpt_preset(preset)
        path = resolve(path, filename=filename, allow_patterns=("*.json", "*.safetensors"), revision=revision,
                       cache_dir=cache_dir, local_files_only=local_files_only, what="GPT checkpoint")
        state = read_state_dict(path)
        if path.is_dir() and (path / "config.json").is_file():
            saved = read_config(path)
            if saved.get("kind") != "gpt" or not isinstance(saved.get("config"), dict):
                raise CheckpointError(f"{path}/config.json is not a GPT config (kind={saved.get('kind')!r})")
            config = GPTConfig.from_saved({**saved["config"], **overrides}, path / "config.json")
            if preset is not None and config.preset_differences(preset):
                raise CheckpointError(f"preset {preset!r} does not match {path}/config.json: "
                                      + "; ".join(config.preset_differences(preset)))
        elif preset is not None:
            config = GPTConfig.from_preset(preset, **overrides)
        else:
            config = GPTConfig.from_dict({**infer_gpt_config(state, path.name, n_head=overrides.get("n_head")),
                                          **overrides})
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()  # shapes and dtypes checked against these
        state = validate_state_dict(state, expected, ignore_prefixes=("freqs_cis",), ignore_substrings=("kv_cache",),
                                    what=f"GPT ({describe(config)})", hint=mismatch_hint(state, config, path.name))
        model.load_state_dict(state, strict=True, assign=True)
        # Non-persistent buffers were built on meta; rebuild them for real.
        model.rope = rope_table_2d(config.grid_size, config.head_dim, config.cls_token_num, config.rope_base)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike, max_shard_bytes: Optional[int] = None):
        """model.safetensors (sharded with an index past max_shard_bytes) + config.json {"kind": "gpt", ...}."""
        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        return save_state_pretrained(directory, self.state_dict(), {"kind": "gpt", "config": self.config.to_dict()},
                                     **kwargs)


# ---------------------------------------------------------------------- checkpoint diagnosis
def describe(config: GPTConfig) -> str:
    name = f"preset {config.preset!r}, " if config.preset else ""
    return (f"{name}{config.model_type}, dim={config.dim}, n_layer={config.n_layer}, n_head={config.n_head}, "
            f"vocab_size={config.vocab_size}, cls_token_num={config.cls_token_num}")


def infer_gpt_config(state: dict[str, torch.Tensor], filename: str = "", n_head: Optional[int] = None) -> dict:
    """Config fields read from an official-layout state dict's shapes (n_head from the preset with that shape
    unless given: head count is not visible in the weights)."""
    if "tok_embeddings.weight" not in state:
        raise CheckpointError("cannot infer the GPT config: no 'tok_embeddings.weight' key (is this a LlamaGen GPT "
                              f"checkpoint?); keys start with {sorted(state)[:5]}")
    vocab, dim = state["tok_embeddings.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    fields: dict = dict(vocab_size=int(vocab), dim=int(dim), n_layer=len(layers))
    if "cls_embedding.embedding_table.weight" in state:
        fields.update(model_type="c2i", cls_token_num=1,
                      num_classes=int(state["cls_embedding.embedding_table.weight"].shape[0]) - 1)
    elif "cls_embedding.uncond_embedding" in state:
        tokens, caption_dim = state["cls_embedding.uncond_embedding"].shape
        fields.update(model_type="t2i", cls_token_num=int(tokens), caption_dim=int(caption_dim))
    preset = next((n for n, p in GPT_PRESETS.items() if (p["dim"], p["n_layer"]) == (dim, len(layers))), None)
    if preset is None and n_head is None:
        raise CheckpointError(f"the checkpoint (dim={dim}, n_layer={len(layers)}) matches no GPT preset, so n_head "
                              f"cannot be inferred; pass preset=... or n_head=... explicitly")
    if preset is not None:
        fields.update(n_head=GPT_PRESETS[preset]["n_head"],
                      preset=preset + ("-t2i" if fields.get("model_type") == "t2i" else ""))
    else:
        fields.update(n_head=int(n_head), preset=None)
    if m := re.search(r"_(\d+)$", Path(filename).stem):  # c2i_B_256.pt, t2i_XL_stage2_512.pt
        fields["image_size"] = int(m.group(1))
    return fields


def mismatch_hint(state: dict[str, torch.Tensor], config: GPTConfig, filename: str = "") -> str:
    """A sentence naming the config fields the checkpoint disagrees on, and the preset to try if one matches."""
    try:
        guess = infer_gpt_config(state, filename, n_head=config.n_head)
    except CheckpointError as e:
        return str(e)
    differing = {k: v for k, v in guess.items()
                 if k not in ("preset", "n_head", "image_size") and getattr(config, k) != v}
    if not differing:
        return ""
    text = "The checkpoint has " + ", ".join(f"{k}={v}" for k, v in differing.items())
    if guess.get("preset"):
        text += f" (preset {guess['preset']!r}); try from_pretrained(path, preset={guess['preset']!r})"
    return text
