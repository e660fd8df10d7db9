"""LlamaGen-compatible GPT: a Llama decoder over [condition prefix; VQ image tokens] with a static KV cache.

Contract (facts: shared/DESIGN.md §3):
  * State-dict keys are LlamaGen's, unchanged (`tok_embeddings`, `cls_embedding.*`, `layers.{i}.attention.wqkv`,
    `...wo`, `...feed_forward.w1/w2/w3`, `...attention_norm`, `...ffn_norm`, `norm`, `output`), so official
    checkpoints load with `GPT.from_pretrained`. The KV cache and RoPE tables are NOT in the state dict.
  * Sequence layout: positions 0..T-1 hold the condition prefix (T = cls_token_num: 1 class embedding, or 120
    projected caption features), image token i sits at position T + i. 2D RoPE with T rows of zeros in front
    (q and k at prefix positions are zero vectors — LlamaGen's quirk, replicated on purpose).
  * `forward_hidden(x [R, L, d], start, rows)` runs positions start..start+L-1 for cache rows `rows` (a slice),
    writes their K/V into the static cache and attends only over the filled part `[:start+L]`; it returns the
    final *normed* hidden state [R, L, d]. `head(h)` -> fp32 logits. Decode, prefill and catch-up prefill of
    rows that skipped steps are all this one call.
  * `logits(cond, tokens)` -> fp32 [B, N, V], teacher-forced full recompute without the cache (logit i predicts
    token i); it is the oracle the cached decode is tested against and the training forward.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import read_config, read_state_dict, save_pretrained as save_state_pretrained, validate_state_dict
from .config import GPT_PRESETS, GPTConfig, check_gpt_preset
from .errors import CheckpointError, InvalidArgument, check_token_ids


class RMSNorm(nn.Module):
    """LlamaGen's RMSNorm: normalise in fp32, cast back, then scale (the order matters in bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class KVCache:
    """Static per-layer K/V buffers [rows, n_head, max_len, head_dim]; a plain object so it never enters state_dict."""

    def __init__(self, rows: int, n_head: int, max_len: int, head_dim: int, dtype, device):
        shape = (rows, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, rows: slice, start: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [R, H, L, D] written at positions start..start+L-1; returns views of the filled part [:start+L]."""
        end = start + k.shape[2]
        self.k[rows, :, start:end] = k
        self.v[rows, :, start:end] = v
        return self.k[rows, :, :end], self.v[rows, :, :end]


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [R, L, H, D], rope [L, D/2, 2] (cos, sin) -> rotated x; interleaved pairs (2m, 2m+1), computed in fp32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos = rope[None, :, None, :, 0]
    sin = rope[None, :, None, :, 1]
    rotated = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                           pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1)
    return rotated.flatten(3).type_as(x)


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


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=False)  # rows q | k | v, heads contiguous
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor],
                cache: Optional[KVCache], rows: slice, start: int) -> torch.Tensor:
        """x [R, L, d]; mask None (attend to every key given) or bool [R|1, 1, L, keys]."""
        R, L, d = x.shape
        q, k, v = self.wqkv(x).split(d, dim=-1)
        q = apply_rotary(q.view(R, L, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rotary(k.view(R, L, self.n_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(R, L, self.n_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(rows, start, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(R, L, d))


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, rope, mask, cache, rows, start):
        h = x + self.attention(self.attention_norm(x), rope, mask, cache, rows, start)
        return h + self.feed_forward(self.ffn_norm(h))


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
        self.caches: list[KVCache] = []
        self.cache_rows = 0
        self.cache_len = 0

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        keep_rope_fp32(self, self.config)
        return out

    # ------------------------------------------------------------------ conditions
    def check_condition(self, cond: torch.Tensor, *, allow_null: bool = False) -> int:
        """Validate a batch of conditions; returns B. c2i: LongTensor [B] ids; t2i: float [B, T, caption_dim]."""
        c = self.config
        if c.model_type == "c2i":
            if not isinstance(cond, torch.Tensor) or cond.ndim != 1 or cond.dtype not in (torch.int32, torch.int64):
                raise InvalidArgument(f"cond for a class-conditional model must be an integer tensor [B] of class ids, "
                                      f"got {getattr(cond, 'dtype', type(cond).__name__)} {list(getattr(cond, 'shape', []))}")
            top = c.num_classes if allow_null else c.num_classes - 1
            if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) > top):
                raise InvalidArgument(f"class ids must be in [0, {top}], got values in "
                                      f"[{int(cond.min())}, {int(cond.max())}]")
        else:
            want = (c.cls_token_num, c.caption_dim)
            if not isinstance(cond, torch.Tensor) or cond.ndim != 3 or tuple(cond.shape[1:]) != want:
                raise InvalidArgument(f"cond for a text-conditional model must be caption features [B, {want[0]}, "
                                      f"{want[1]}], got {list(getattr(cond, 'shape', []))}")
        if cond.shape[0] == 0:
            raise InvalidArgument("cond must hold at least one condition (batch size >= 1)")
        return cond.shape[0]

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

    # ------------------------------------------------------------------ cache
    def setup_caches(self, rows: int, max_len: Optional[int] = None, dtype=None, device=None) -> None:
        """Allocate the static KV cache once; a later call with a size that fits reuses it (no reallocation)."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        weight = self.output.weight
        dtype, device = dtype or weight.dtype, device or weight.device
        if (self.caches and self.cache_rows >= rows and self.cache_len >= max_len
                and self.caches[0].k.dtype == dtype and self.caches[0].k.device == torch.device(device)):
            return
        self.caches = [KVCache(rows, self.config.n_head, max_len, self.config.head_dim, dtype, device)
                       for _ in self.layers]
        self.cache_rows, self.cache_len = rows, max_len

    def release_caches(self) -> None:
        self.caches, self.cache_rows, self.cache_len = [], 0, 0

    # ------------------------------------------------------------------ forward
    def attention_mask(self, start: int, length: int, prefix_valid: Optional[torch.Tensor]):
        """Bool mask [R|1, 1, L, start+L] for queries start..start+L-1, or None when every key is visible.

        prefix_valid [R, T] (t2i padding) masks prefix keys for every query; the diagonal stays visible, as in
        LlamaGen, so a padded prefix position still attends to itself.
        """
        end = start + length
        if length == 1 and prefix_valid is None:
            return None
        device = self.rope.device
        q_pos = torch.arange(start, end, device=device)[:, None]
        k_pos = torch.arange(end, device=device)[None, :]
        mask = (k_pos <= q_pos)[None, None]  # [1, 1, L, end]
        if prefix_valid is not None:
            T = prefix_valid.shape[1]
            key_ok = torch.ones(prefix_valid.shape[0], end, dtype=torch.bool, device=device)
            key_ok[:, :min(T, end)] = prefix_valid[:, :min(T, end)].to(device=device, dtype=torch.bool)
            mask = (mask & key_ok[:, None, None, :]) | (k_pos == q_pos)[None, None]
        return mask

    def forward_hidden(self, x: torch.Tensor, start: int, rows: Optional[slice] = None,
                       prefix_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [R, L, d] embeddings at positions start..start+L-1 -> final normed hidden [R, L, d].

        With caches set up, `rows` selects the cache rows (default 0..R-1); keys are read only up to start+L.
        Without caches (training / oracle) start must be 0 and attention is causal over x itself.
        """
        R, L, _ = x.shape
        end = start + L
        use_cache = bool(self.caches)
        if use_cache:
            rows = slice(0, R) if rows is None else rows
            if rows.stop > self.cache_rows or end > self.cache_len or rows.stop - rows.start != R:
                raise InvalidArgument(f"cache of {self.cache_rows} rows x {self.cache_len} positions cannot hold rows "
                                      f"{rows.start}:{rows.stop} (batch {R}) at positions {start}:{end}")
        elif start != 0:
            raise InvalidArgument("forward_hidden without a KV cache must start at position 0")
        if end > self.rope.shape[0]:
            raise InvalidArgument(f"positions up to {end} exceed the model's {self.rope.shape[0]} positions")
        rope = self.rope[start:end].float()  # fp32 rotation even if the module was cast to bf16
        mask = self.attention_mask(start, L, prefix_valid)
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, self.caches[i] if use_cache else None, rows, start)
        return self.norm(h)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final normed hidden [..., d] -> fp32 logits [..., V] (linear, no bias, so CFG commutes with it)."""
        return self.output(hidden).float()

    def logits(self, cond: torch.Tensor, tokens: torch.Tensor,
               cond_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced fp32 logits [B, N, V]; logit i predicts image token i (no KV cache involved)."""
        B = self.check_condition(cond, allow_null=True)
        check_token_ids("tokens", tokens, self.config.vocab_size)
        if tokens.ndim != 2 or tokens.shape[0] != B:
            raise InvalidArgument(f"tokens must be [B={B}, N], got {list(tokens.shape)}")
        N = tokens.shape[1]
        if N < 1 or N > self.config.num_image_tokens:
            raise InvalidArgument(f"tokens must hold 1..{self.config.num_image_tokens} image tokens, got {N}")
        T = self.config.cls_token_num
        x = torch.cat([self.condition_embeddings(cond), self.embed_tokens(tokens[:, :-1])], dim=1)
        saved, self.caches = self.caches, []
        try:
            hidden = self.forward_hidden(x, 0, prefix_valid=cond_mask)
        finally:
            self.caches = saved
        return self.head(hidden[:, T - 1:])

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
        from .hub import resolve

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
        expected = {k: v.shape for k, v in model.state_dict().items()}
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
