"""What every decoding loop shares -- the eager loop (generate.py), the engine's fixed-shape steps (engine.py) and
Jacobi windows (jacobi.py) -- so each piece is written once:

  * `StepRecord`: what one sequential step saw, passed to `on_step` (Collect stores parts of it);
  * `GenerationStats`: the base-model work of a generation, in rows, and its forward passes;
  * `mode_logits`: the logits a mode samples from, with one head GEMM over exactly the rows it needs;
  * `catch_up_uncond`: the prefill of the uncond rows over the positions they skipped (row compaction);
  * `weak_ops_kwargs`: the fused decode ops of a weak model's step, when it has any;
  * `set_up_prefix`: a request's condition on the device, its prefix mask on the cache and the null prefix of the
    uncond rows (the engine's requests and the eager loops); `EagerSetup.prepare`: the eager loops' fresh caches
    on top of it, with the condition embedded and the weak model prefilled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..guidance.config import MODE_TABLE, needs_uncond, sampler_inputs
from .decode_ops import DecodeOps
from .kv_cache import KVCache


@dataclass
class StepRecord:
    """What one decode step saw; passed to `on_step` (Collect stores parts of it)."""
    index: int  # image token index being sampled
    mode: str
    tokens: torch.Tensor  # [B] sampled token
    hidden_cond: torch.Tensor  # [B, d] final normed hidden of the cond rows
    hidden_uncond: Optional[torch.Tensor]  # [B, d] or None when the uncond rows were not computed
    weak_logits: Optional[torch.Tensor]  # [B, V] or None
    mixed_logits: torch.Tensor  # [B, V] fp32 logits the token was sampled from (before temperature)


@dataclass
class GenerationStats:
    """Base-model work, counted in rows: a row = one sequence through the base model at one position.

    Sequential decoding: one forward pass per token, `step_rows[i]` rows at the pass producing token i.
    Jacobi decoding (jacobi.py): `step_rows[p]` = rows x window positions of forward pass p, and the pass counts
    below say how many passes the images needed."""
    step_rows: list = field(default_factory=list)  # row-positions computed by each decoding forward pass
    catchup_rows: int = 0  # row-positions of catch-up prefills of the uncond half
    catchup_calls: int = 0
    weak_steps: int = 0  # weak-model positions computed per image
    forward_passes: int = 0  # base-model decoding forward calls (the prefill pass included; catch-ups not)
    passes_per_image: list = field(default_factory=list)  # [B]: the pass after which image b was complete
    accepted_per_pass: list = field(default_factory=list)  # tokens that became final at each pass (all images)

    @property
    def base_rows(self) -> int:
        return sum(self.step_rows) + self.catchup_rows

    def as_dict(self) -> dict:
        per_image = list(self.passes_per_image)
        return dict(step_rows=list(self.step_rows), base_rows=self.base_rows, catchup_rows=self.catchup_rows,
                    catchup_calls=self.catchup_calls, weak_steps=self.weak_steps,
                    forward_passes=self.forward_passes, forward_passes_per_image=per_image,
                    forward_passes_mean=sum(per_image) / len(per_image) if per_image else 0.0,
                    accepted_per_pass=list(self.accepted_per_pass))

    def sequential(self, batch: int, num_tokens: int) -> "GenerationStats":
        """Fill the pass counts of sequential decoding: one pass per token, every image complete after N."""
        self.forward_passes = num_tokens
        self.passes_per_image = [num_tokens] * batch
        self.accepted_per_pass = [batch] * num_tokens
        return self


def prefill_inputs(gpt, prefix_cond: torch.Tensor, prefix_uncond: Optional[torch.Tensor], guesses: torch.Tensor,
                   two_halves: bool) -> torch.Tensor:
    """A request's first forward input: the condition prefix [B, T, d] (and the null prefix after it, as the uncond
    rows, when they run) followed by `guesses` [B, w - 1] image tokens (Jacobi's first window; none sequentially)
    -> [R, T + w - 1, d]."""
    embedded = gpt.embed_tokens(guesses)
    x = torch.cat([prefix_cond, embedded], 1)
    return torch.cat([x, torch.cat([prefix_uncond, embedded], 1)]) if two_halves else x


def catch_up_uncond(gpt, cache: KVCache, null_prefix: torch.Tensor, tokens: torch.Tensor, filled: int, position: int,
                    stats: GenerationStats, backend: str = "torch") -> torch.Tensor:
    """Prefill the uncond rows (cache rows B:2B) over the positions filled..position-1 they skipped: the null
    prefix [B, T, d], then the already sampled image tokens [B, >= position - T]; counted in `stats`.
    -> bool [] on the device: whether its hidden states are finite (the caller's NaN flag takes it)."""
    B, T = null_prefix.shape[0], gpt.config.cls_token_num
    parts = [null_prefix[:, filled:T]] if filled < T else []
    parts.append(gpt.embed_tokens(tokens[:, max(filled, T) - T:position - T]))
    hidden = gpt.forward_hidden(torch.cat(parts, dim=1), cache, start=filled, row_start=B, backend=backend)[:, -1]
    stats.catchup_rows += B * (position - filled)
    stats.catchup_calls += 1
    return torch.isfinite(hidden).all()


def mode_logits(gpt, mode: str, batch: int, hidden: torch.Tensor, weak_hidden: Optional[torch.Tensor]):
    """The logits a mode samples from, with one head GEMM over exactly the rows it needs.

    hidden [R, ..., d] (cond rows 0:B first, uncond B:2B when computed), weak_hidden [B, ..., d] | None ->
    (cond, uncond, weak, sample_mode, logits): each [B, ..., V] fp32 or None, the mode to pass to the sampler
    (fast samples the weak prediction as a plain conditional row) and the GEMM's output [k*B, ..., V]."""
    spec = MODE_TABLE[mode]
    B = batch
    base_rows = hidden[:2 * B] if spec.cond_logits and spec.uncond else \
        hidden[:B] if spec.cond_logits else hidden[B:2 * B] if spec.uncond else None
    parts = ([] if base_rows is None else [base_rows]) + ([weak_hidden.to(hidden.dtype)] if spec.weak else [])
    logits = gpt.head(parts[0] if len(parts) == 1 else torch.cat(parts))  # one GEMM, fp32 [k*B, ..., V]
    split = list(logits.split(B))
    cond = split.pop(0) if spec.cond_logits else None
    uncond = split.pop(0) if spec.uncond else None
    weak = split.pop(0) if spec.weak else None
    mode, cond, uncond, weak = sampler_inputs(mode, cond, uncond, weak)
    return cond, uncond, weak, mode, logits


def weak_ops_kwargs(ops: Optional[DecodeOps]) -> dict:
    """decode_ops for a weak model's step, passed only when there are some (stand-in weak models in tests
    implement the protocol without it)."""
    return {} if ops is None else {"decode_ops": ops}


def set_up_prefix(gpt, cache: KVCache, cond: torch.Tensor, cond_mask: Optional[torch.Tensor], uses_uncond: bool):
    """-> (cond on the device, bool prefix mask [B, T] on the device or None, null prefix [B, T, d] or None): the
    prefix mask is set on `cache` for the cond rows and, when the uncond rows run, for them too (LlamaGen masks
    both halves alike); the null prefix is the uncond rows' condition embedding."""
    device = gpt.output.weight.device
    mask = None if cond_mask is None else cond_mask.to(device=device, dtype=torch.bool)
    cache.set_prefix_mask(mask, copies=2 if uses_uncond else 1)
    cond = cond.to(device)
    null_prefix = gpt.condition_embeddings(gpt.null_condition(cond.shape[0], cond)) if uses_uncond else None
    return cond, mask, null_prefix


@dataclass
class EagerSetup:
    """The state of an eager loop (generate's sequential loop, Jacobi's eager runner): fresh caches, the condition
    prefix embedded (both halves when any token needs the uncond rows), the weak model prefilled."""
    cache: KVCache  # rows [cond 0:B; uncond B:2B] when any token needs the uncond half
    weak_cache: Optional[KVCache]
    prefix_cond: torch.Tensor  # [B, T, d]
    prefix_uncond: Optional[torch.Tensor]  # [B, T, d] the null prefix, when any token needs the uncond half
    all_rows_always: bool  # compact_rows=False: the uncond half is computed at every step once any token needs it

    @classmethod
    def prepare(cls, gpt, cond: torch.Tensor, cond_mask: Optional[torch.Tensor], modes: list, weak,
                compact_rows: bool) -> "EagerSetup":
        B, N = cond.shape[0], len(modes)
        uses_uncond = needs_uncond(modes)
        cache = gpt.new_cache(2 * B if uses_uncond else B, gpt.config.cls_token_num + N)
        cond, mask, prefix_uncond = set_up_prefix(gpt, cache, cond, cond_mask, uses_uncond)
        weak_cache = None
        if weak is not None:
            weak_cache = weak.new_cache(B)
            weak.prefill(cond, weak_cache, mask)
        return cls(cache, weak_cache, gpt.condition_embeddings(cond), prefix_uncond, uses_uncond and not compact_rows)

    def runs_uncond(self, mode: str) -> bool:
        """Whether a step (or window) of `mode` computes the uncond rows (the eager twin of engine.Request.rows)."""
        return MODE_TABLE[mode].uncond or self.all_rows_always
