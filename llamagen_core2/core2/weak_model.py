"""CoRe^2 weak model for LlamaGen: predicts the CFG hidden state from the conditional one.

Contract (design: docs/design.md#weak-model):
  * Hidden-space design. LlamaGen's head is linear without bias, so CFG logits = W_out (h_u + s (h_c - h_u)).
    The weak model maps the base model's conditional final normed hidden state h_c[i] (plus the same
    class/caption prefix) to a predicted CFG hidden state h_w[i]; logits = frozen `gpt.head(h_w[i])`.
  * Architecture: a small causal LlamaGen-style transformer (decode/model.py's TransformerBlock / RMSNorm / KVCache /
    2D RoPE with zero prefix rows) of its own width. Sequence = [own condition prefix (T positions);
    proj_in(h_c[0..N-1])] with h_c[i] at position T + i (the grid cell of the token it predicts).
    Output h_w = h_c * (1 + skip_scale) + proj_out(norm(trunk)); skip_scale and proj_out start at zero, so an
    untrained weak model predicts exactly the conditional output (residual parametrisation).
  * Decoding protocol (the engine owns the cache, as for the base): `new_cache(rows)`, `prefill(cond, cache,
    cond_mask)` (the condition prefix at positions 0..T-1), then for token i in order
    `step_hidden(hidden_cond [B, d], cache, start=T + i)` (or `position=` a device tensor holding T + i, inside
    a CUDA graph) -> predicted CFG hidden [B, d]; the engine turns it into logits with the frozen `gpt.head`.
    `window_hidden(hidden_cond [B, L, d], ...)` runs L consecutive steps in one forward (Jacobi decoding).
    Both take `decode_ops=` (the fused decode-layer kernels the engine chose for the trunk's own shapes,
    decode/decode_ops.py); the engine passes it only to a weak model with LlamaGen blocks (`layers`).
    `check_compatible(gpt)` refuses a weak model built for another base.
  * Training forward (no cache): `forward(cond, hidden_cond [B, N, d], cond_mask) -> predicted hidden [B, N, d]`.
  * Checkpoints: safetensors + config.json {"kind": "weak", "config", "base", "cfg_scale", ...}; `base` records
    the base model's shape facts and a weights fingerprint. Using it with another base raises CheckpointError
    naming every mismatching field (set `require_same_weights=False` to allow a same-shape base with other weights).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..config import DictConfig, GPTConfig
from ..decode.kv_cache import KVCache
from ..decode.model import RMSNorm, TransformerBlock, init_weights, keep_rope_fp32, rope_table_2d, run_blocks
from ..errors import CheckpointError, InvalidArgument, NonFiniteError, check_all_finite
from ..io.checkpoint import read_config, read_state_dict, save_pretrained as save_state_pretrained, validate_state_dict

# name -> trunk shape. Width 512 keeps the trunk a few % of a GPT-B step; the shared head dominates the rest.
WEAK_PRESETS: dict[str, dict] = {
    "W-1": dict(n_layer=1, n_head=8, dim=512),
    "W-2": dict(n_layer=2, n_head=8, dim=512),
    "W-4": dict(n_layer=4, n_head=8, dim=512),
    "W-2-wide": dict(n_layer=2, n_head=16, dim=1024),
}

# Base-model facts a weak model depends on; a mismatch in any of them makes it unusable.
BASE_FIELDS = ("model_type", "dim", "vocab_size", "cls_token_num", "num_classes", "caption_dim", "grid_size")


@dataclass
class WeakConfig(DictConfig):
    dim: int = 512
    n_layer: int = 2
    n_head: int = 8
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    preset: Optional[str] = None

    def __post_init__(self):
        for name in ("dim", "n_layer", "n_head", "multiple_of"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgument(f"weak model {name} must be a positive integer, got {value!r}")
        if self.dim % self.n_head or (self.dim // self.n_head) % 2:
            raise InvalidArgument(f"weak model dim ({self.dim}) must split into n_head ({self.n_head}) heads of even "
                                  f"width")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "WeakConfig":
        if name not in WEAK_PRESETS:
            raise InvalidArgument(f"unknown weak-model preset {name!r}; allowed: {sorted(WEAK_PRESETS)}")
        return cls.from_dict({**WEAK_PRESETS[name], "preset": name, **overrides})


def check_base_facts(base: dict, source) -> None:
    """The `base` record of a saved weak model / a Collect manifest: every BASE_FIELDS entry of the right type."""
    if not isinstance(base, dict):
        raise CheckpointError(f"{source}: base must be a JSON object of base-model facts, got {base!r}")
    for name in BASE_FIELDS:
        value = base.get(name)
        if name == "model_type":
            ok = value in ("c2i", "t2i")
        elif name in ("num_classes", "caption_dim"):  # one of them is null, depending on model_type
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        if not ok:
            raise CheckpointError(f"{source}: base field {name!r} is missing or invalid, got {value!r}")
    needed = "num_classes" if base["model_type"] == "c2i" else "caption_dim"
    if base.get(needed) is None:
        raise CheckpointError(f"{source}: base field {needed!r} must be a positive integer for a "
                              f"{base['model_type']} base")


def base_facts(gpt_config: GPTConfig) -> dict:
    """The base-model facts a weak model is built for (see BASE_FIELDS) plus the preset name."""
    facts = {name: getattr(gpt_config, name) for name in BASE_FIELDS}
    if gpt_config.model_type == "c2i":
        facts["caption_dim"] = None  # irrelevant for class-conditional bases
    else:
        facts["num_classes"] = None
    facts["preset"] = gpt_config.preset
    return facts


@torch.no_grad()
def weights_fingerprint(model: nn.Module, samples_per_tensor: int = 4096) -> str:
    """A cheap content hash of a model's weights: names, shapes and an evenly strided sample of every tensor.

    Values are hashed after a cast to bf16 so the same checkpoint loaded in fp32 or bf16 gives the same hash.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not tensor.is_floating_point():
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(f"{name}:{list(tensor.shape)};".encode())
        digest.update(sample.numpy().tobytes())
    return "w-" + digest.hexdigest()[:24]


class WeakModel(nn.Module):
    """Small causal transformer: (condition prefix, h_c[0..i]) -> predicted CFG hidden state at token i."""

    def __init__(self, config: WeakConfig, base: dict, *, cfg_scale: Optional[float] = None,
                 base_fingerprint: Optional[str] = None, extra: Optional[dict] = None):
        super().__init__()
        missing = [k for k in BASE_FIELDS if k not in base]
        if missing:
            raise InvalidArgument(f"base facts lack {missing}; build them with weak_model.base_facts(gpt.config)")
        self.config, self.base = config, dict(base)
        self.cfg_scale, self.base_fingerprint = cfg_scale, base_fingerprint
        self.extra = dict(extra or {})
        self.require_same_weights = True
        w, d = config.dim, base["dim"]
        # TransformerBlock takes a GPTConfig: describe the trunk as one (vocab unused).
        self.trunk_config = GPTConfig(dim=w, n_layer=config.n_layer, n_head=config.n_head, vocab_size=1,
                                      model_type=base["model_type"], cls_token_num=base["cls_token_num"],
                                      image_size=base["grid_size"], downsample=1, multiple_of=config.multiple_of,
                                      norm_eps=config.norm_eps, rope_base=config.rope_base)
        if base["model_type"] == "c2i":
            self.cond_embedding = nn.Embedding(base["num_classes"] + 1, w)  # +1: the null class, for completeness
        else:
            self.cond_embedding = nn.Sequential(nn.Linear(base["caption_dim"], w, bias=False), nn.GELU("tanh"),
                                                nn.Linear(w, w, bias=False))
        self.proj_in = nn.Linear(d, w, bias=False)
        self.layers = nn.ModuleList(TransformerBlock(self.trunk_config) for _ in range(config.n_layer))
        self.norm = RMSNorm(w, config.norm_eps)
        self.proj_out = nn.Linear(w, d, bias=False)
        self.skip_scale = nn.Parameter(torch.zeros(d))
        self.reset_parameters()
        tc = self.trunk_config
        self.register_buffer("rope", rope_table_2d(tc.grid_size, tc.head_dim, tc.cls_token_num, tc.rope_base),
                             persistent=False)
        self._verified: Optional[tuple] = None  # memo of the last base check_compatible accepted

    def reset_parameters(self) -> None:
        init_weights(self)
        nn.init.zeros_(self.proj_out.weight)  # residual start: an untrained model predicts h_c exactly
        nn.init.zeros_(self.skip_scale)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        keep_rope_fp32(self, self.trunk_config)
        return out

    @classmethod
    def for_base(cls, gpt, preset: str = "W-2", *, cfg_scale: Optional[float] = None, fingerprint: bool = True,
                 **overrides) -> "WeakModel":
        """A fresh (untrained = cond-output) weak model shaped for base model `gpt`."""
        config = WeakConfig.from_preset(preset, **overrides)
        return cls(config, base_facts(gpt.config), cfg_scale=cfg_scale,
                   base_fingerprint=weights_fingerprint(gpt) if fingerprint else None)

    # ------------------------------------------------------------------ compatibility
    def check_compatible(self, gpt) -> None:
        """Raise CheckpointError naming every base fact (and the weights fingerprint) that differs from `gpt`."""
        key = (id(gpt), gpt.output.weight.data_ptr())
        if self._verified == key:
            return
        have = base_facts(gpt.config)
        diffs = [f"{k}: weak model built for {self.base.get(k)!r}, base has {have[k]!r}"
                 for k in BASE_FIELDS if self.base.get(k) != have[k]]
        if diffs:
            raise CheckpointError(f"this weak model was built for a different base model "
                                  f"(preset {self.base.get('preset')!r}) than the one given "
                                  f"(preset {have['preset']!r}): " + "; ".join(diffs))
        if self.require_same_weights and self.base_fingerprint is not None:
            got = weights_fingerprint(gpt)
            if got != self.base_fingerprint:
                raise CheckpointError(
                    f"this weak model was trained for base weights {self.base_fingerprint}, but the base model's "
                    f"weights fingerprint is {got} (same shapes, different checkpoint); retrain it with "
                    f"`llamagen-core2 collect/reflect` on this base, or set weak.require_same_weights = False")
        self._verified = key

    # ------------------------------------------------------------------ forward
    def _prefix(self, cond: torch.Tensor) -> torch.Tensor:
        """cond (class ids [B] or caption features [B, T, C]) -> prefix [B, T, w]."""
        if self.base["model_type"] == "c2i":
            return self.cond_embedding(cond)[:, None, :]
        return self.cond_embedding(cond.to(self.proj_in.weight.dtype))

    def _output(self, hidden_cond: torch.Tensor, trunk_out: torch.Tensor) -> torch.Tensor:
        h = hidden_cond.to(self.proj_out.weight.dtype)
        return h * (1 + self.skip_scale) + self.proj_out(trunk_out)

    def forward(self, cond: torch.Tensor, hidden_cond: torch.Tensor,
                cond_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced: hidden_cond [B, N, d] (h_c of tokens 0..N-1) -> predicted CFG hidden [B, N, d]."""
        B, N, d = hidden_cond.shape
        T = self.base["cls_token_num"]
        if d != self.base["dim"] or N > self.base["grid_size"] ** 2:
            raise InvalidArgument(f"hidden_cond must be [B, N <= {self.base['grid_size'] ** 2}, {self.base['dim']}], "
                                  f"got {list(hidden_cond.shape)}")
        x = torch.cat([self._prefix(cond), self.proj_in(hidden_cond.to(self.proj_in.weight.dtype))], dim=1)
        out = run_blocks(self.layers, self.norm, self.rope, x, prefix_valid=cond_mask)[:, T:]
        return self._output(hidden_cond, out)

    # ------------------------------------------------------------------ decoding (caller-owned cache)
    def new_cache(self, rows: int, dtype=None, device=None) -> KVCache:
        weight = self.proj_in.weight
        return KVCache.for_config(self.trunk_config, rows, dtype=dtype or weight.dtype, device=device or weight.device)

    @torch.no_grad()
    def prefill(self, cond: torch.Tensor, cache: KVCache, cond_mask: Optional[torch.Tensor] = None,
                backend: str = "torch") -> None:
        """Run the condition prefix [B] / [B, T, C] at positions 0..T-1 into cache rows 0..B-1."""
        cache.set_prefix_mask(cond_mask)  # decode steps keep hiding padded prefix keys
        run_blocks(self.layers, self.norm, self.rope, self._prefix(cond.to(self.proj_in.weight.device)), cache,
                   backend=backend)

    @torch.no_grad()
    def step_hidden(self, hidden_cond: torch.Tensor, cache: KVCache, *, start: Optional[int] = None,
                    position: Optional[torch.Tensor] = None, max_end: Optional[int] = None,
                    backend: str = "torch", decode_ops=None) -> torch.Tensor:
        """hidden_cond [B, d] of token i at sequence position T + i (`start`, or the device tensor `position`) ->
        predicted CFG hidden [B, d] in the weak model's dtype. Steps must come in token order (no cache holes).
        `decode_ops`: the fused decode-layer kernels the caller chose for this trunk's shape (model.run_blocks)."""
        if hidden_cond.dim() != 2 or hidden_cond.shape[1] != self.base["dim"]:
            raise InvalidArgument(f"hidden_cond must be [B, {self.base['dim']}], got {list(hidden_cond.shape)}")
        return self.window_hidden(hidden_cond[:, None], cache, start=start, position=position, max_end=max_end,
                                  backend=backend, decode_ops=decode_ops)[:, 0]

    @torch.no_grad()
    def window_hidden(self, hidden_cond: torch.Tensor, cache: KVCache, *, start: Optional[int] = None,
                      position: Optional[torch.Tensor] = None, max_end: Optional[int] = None,
                      backend: str = "torch", decode_ops=None) -> torch.Tensor:
        """hidden_cond [B, L, d] of tokens i..i+L-1 at positions T + i.. (`start`, or the device tensor `position`
        holding T + i) -> predicted CFG hidden [B, L, d]: L steps in one forward (Jacobi decoding writes the
        window's cache entries; those of guessed tokens are rewritten by a later window before any query reads
        them, docs/decoding.md)."""
        if hidden_cond.dim() != 3 or hidden_cond.shape[2] != self.base["dim"]:
            raise InvalidArgument(f"hidden_cond must be [B, L, {self.base['dim']}], got {list(hidden_cond.shape)}")
        x = self.proj_in(hidden_cond.to(self.proj_in.weight.dtype))  # [B, L, w]
        out = run_blocks(self.layers, self.norm, self.rope, x, cache, start=start or 0, position=position,
                         max_end=max_end, backend=backend, decode_ops=decode_ops)
        return self._output(hidden_cond, out)

    # ------------------------------------------------------------------ checkpoints
    def describe(self) -> dict:
        return {"kind": "weak", "config": self.config.to_dict(), "base": self.base,
                "base_fingerprint": self.base_fingerprint, "cfg_scale": self.cfg_scale, "extra": self.extra}

    def save_pretrained(self, directory: str | os.PathLike):
        return save_state_pretrained(directory, self.state_dict(), self.describe())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, gpt=None, *, device=None, dtype=None,
                        require_same_weights: bool = True) -> "WeakModel":
        """Load a directory written by save_pretrained; with `gpt`, check it was built for that base (shape facts,
        and its weights fingerprint unless require_same_weights=False)."""
        directory = Path(directory)
        saved = read_config(directory)
        if saved.get("kind") != "weak" or not isinstance(saved.get("config"), dict) \
                or not isinstance(saved.get("base"), dict):
            raise CheckpointError(f"{directory}/config.json is not a weak-model config (kind={saved.get('kind')!r}); "
                                  f"weak models are written by `llamagen-core2 reflect`")
        check_base_facts(saved["base"], directory / "config.json")
        cfg_scale, extra = saved.get("cfg_scale"), saved.get("extra")
        if cfg_scale is not None and (isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float))
                                      or not math.isfinite(cfg_scale)):
            raise CheckpointError(f"{directory}/config.json: cfg_scale must be a finite number or null, "
                                  f"got {cfg_scale!r}")
        fingerprint = saved.get("base_fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise CheckpointError(f"{directory}/config.json: base_fingerprint must be a string or null, "
                                  f"got {fingerprint!r}")
        if extra is not None and not isinstance(extra, dict):
            raise CheckpointError(f"{directory}/config.json: extra must be a JSON object, got {extra!r}")
        model = cls(WeakConfig.from_saved(saved["config"], directory / "config.json"), saved["base"],
                    cfg_scale=cfg_scale, base_fingerprint=saved.get("base_fingerprint"), extra=extra)
        expected = model.state_dict()  # shapes and dtypes checked against these
        state = validate_state_dict(read_state_dict(directory), expected, what="weak model")
        try:  # a NaN weak model would sample garbage silently: refuse it at the door
            check_all_finite(f"{directory}: weak model", state)
        except NonFiniteError as e:
            raise CheckpointError(f"{e}; retrain it with `llamagen-core2 reflect`") from None
        model.load_state_dict(state, strict=True)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        model.require_same_weights = bool(require_same_weights)
        if gpt is not None:
            model.check_compatible(gpt)
        return model.eval()
