"""The KV cache: caller-owned static K/V buffers of one transformer's layers (docs/design.md#decode-engine: nothing
per call lives on a model). `GPT.new_cache` / `WeakModel.new_cache` size one for their model; the engine keeps its
caches across requests while they fit.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import GPTConfig


class KVCache:
    """Caller-owned static K/V buffers of every layer of one transformer (never part of a state dict).

    k[l], v[l]: [rows, n_head, max_len, head_dim]. key_valid: None, or bool [rows, max_len] that is False at
    padded t2i prefix keys (LlamaGen hides them from every query but their own position). Every buffer keeps its
    address for the cache's life (the mask is rewritten in place), so CUDA graphs that read them stay valid."""

    def __init__(self, n_layer: int, rows: int, n_head: int, max_len: int, head_dim: int, *, dtype, device):
        shape = (rows, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self._key_valid: Optional[torch.Tensor] = None  # allocated by the first masked request, then reused
        self.masked = False

    @classmethod
    def for_config(cls, config: GPTConfig, rows: int, max_len: Optional[int] = None, *, dtype, device) -> "KVCache":
        return cls(config.n_layer, rows, config.n_head, config.max_seq_len if max_len is None else max_len,
                   config.head_dim, dtype=dtype, device=device)

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def key_valid(self) -> Optional[torch.Tensor]:
        return self._key_valid if self.masked else None

    def fits(self, rows: int, max_len: int, dtype, device) -> bool:
        k = self.k[0]
        return k.shape[0] >= rows and k.shape[2] >= max_len and k.dtype == dtype and k.device == torch.device(device)

    def set_prefix_mask(self, prefix_valid: Optional[torch.Tensor], copies: int = 1) -> None:
        """prefix_valid [B, T] bool (t2i caption padding) for rows 0..B-1, repeated for `copies` halves (LlamaGen
        masks the uncond half identically); None = every key visible."""
        self.masked = prefix_valid is not None
        if not self.masked:
            return
        if self._key_valid is None:
            self._key_valid = torch.ones(self.rows, self.max_len, dtype=torch.bool, device=self.k[0].device)
        B, T = prefix_valid.shape
        self._key_valid.fill_(True)
        self._key_valid[:B * copies, :T] = prefix_valid.to(device=self._key_valid.device,
                                                          dtype=torch.bool).repeat(copies, 1)
