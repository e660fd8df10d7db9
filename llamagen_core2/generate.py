"""Batched AR image-token generation: prefill, decode, CFG / CoRe^2 modes and schedules.

Contract:
  `generate(gpt, cond, ...) -> LongTensor [B, N]` (and a stats dict with `return_stats=True`).
  * Rows of the static KV cache are laid out [cond (0:B); uncond (B:2B)] as in LlamaGen. The same sampled
    token is fed to both halves. A step whose mode does not need the uncond half (cond, fast, or CFG past
    `cfg_interval`) runs the base model on rows 0:B only — the uncond rows are not computed at all.
  * When a later step needs the uncond rows again, their cache is first caught up with one chunked prefill over
    the positions they missed, so attention never reads empty cache entries.
  * Per-token modes: `mode` for every token, or `schedule` (a sequence of N modes, see `make_schedule`).
    cond: c; cfg: u + s (c - u); fast: w; slow: w + a (cfg - w) (w = weak-model prediction, a = w2s_scale).
  * All mixing and sampling goes through `guidance.guided_sample`, token by token.
  * Same seed (or an equally seeded generator) -> same tokens on the same device and batch.
  * `cfg_interval` follows LlamaGen: CFG is applied to tokens 0..cfg_interval+1, cond-only afterwards
    (-1 = always); unlike LlamaGen the uncond rows are dropped afterwards, not computed and thrown away.
    `compact_rows=False` reproduces LlamaGen instead (every step runs all 2B rows once any token needs the
    uncond half, and discards it when unneeded) -- the reference the row compaction is tested against.
  * `engine`: "static" runs decode steps through `static_decode.StaticDecoder` (fixed shapes, CUDA graphs on
    GPU, eager on CPU), "eager" through `gpt.forward_hidden`; "auto" = static on CUDA, eager elsewhere.
    Prefill and catch-up prefills are eager in both. Both give the same tokens for the same seed on CPU.
  * Before allocating, the KV cache + sampling workspace are checked against the device's free memory
    (`memory.py`); a batch that cannot fit raises InvalidArgument instead of failing in the allocator.

Weak-model protocol (CoRe^2, see weak_model.py): an object with
  `start(gpt, cond, cond_mask)` (prefill its own prefix/cache for batch B) and
  `step(hidden_cond [B, d], index) -> logits [B, V]` (prediction of the CFG logits of token `index`),
  optionally `check_compatible(gpt)`. It is stepped at every token whenever any token uses fast/slow, so its own
  cache never has holes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .errors import InvalidArgument, check_finite_scale, check_int, check_sampling_args
from .guidance import guided_sample
from .guidance_config import MODE_TABLE, GuidanceConfig, make_schedule, needs_uncond, needs_weak  # noqa: F401
from .memory import check_fits, estimate_generation_bytes
from .seeding import check_seed
from .static_decode import StaticDecoder

ENGINES = ("auto", "static", "eager")


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
    """Base-model work, counted in rows: a row = one sequence through the base model for one step."""
    step_rows: list = field(default_factory=list)  # rows computed at the step producing token i
    catchup_rows: int = 0  # row-positions of catch-up prefills of the uncond half
    catchup_calls: int = 0
    weak_steps: int = 0

    @property
    def base_rows(self) -> int:
        return sum(self.step_rows) + self.catchup_rows

    def as_dict(self) -> dict:
        return dict(step_rows=list(self.step_rows), base_rows=self.base_rows, catchup_rows=self.catchup_rows,
                    catchup_calls=self.catchup_calls, weak_steps=self.weak_steps)


def _check_args(gpt, cond, cond_mask, num_tokens, cfg_scale, cfg_interval, w2s_scale, temperature, top_k, top_p,
                seed, generator) -> tuple[int, int]:
    B = gpt.check_condition(cond)
    c = gpt.config
    N = c.num_image_tokens if num_tokens is None else check_int("num_tokens", num_tokens, minimum=1,
                                                                maximum=c.num_image_tokens)
    if seed is not None:
        check_seed(seed)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InvalidArgument(f"generator must be a torch.Generator, got {type(generator).__name__}")
    check_finite_scale("cfg_scale", cfg_scale)
    check_finite_scale("w2s_scale", w2s_scale)
    check_sampling_args(temperature, top_k, top_p)
    if isinstance(cfg_interval, bool) or not isinstance(cfg_interval, int) or cfg_interval < -1:
        raise InvalidArgument(f"cfg_interval must be an integer >= -1 (-1 = CFG on every token), got {cfg_interval!r}")
    if seed is not None and generator is not None:
        raise InvalidArgument("give seed or generator, not both")
    if cond_mask is not None:
        if c.model_type != "t2i":
            raise InvalidArgument("cond_mask is only meaningful for text-conditional (t2i) models")
        if not isinstance(cond_mask, torch.Tensor) or tuple(cond_mask.shape) != (B, c.cls_token_num):
            raise InvalidArgument(f"cond_mask must be a tensor [B={B}, {c.cls_token_num}], got "
                                  f"{list(getattr(cond_mask, 'shape', [])) or type(cond_mask).__name__}")
        if cond_mask.is_floating_point() or cond_mask.is_complex() or (
                cond_mask.dtype != torch.bool and not bool(((cond_mask == 0) | (cond_mask == 1)).all())):
            raise InvalidArgument(f"cond_mask must be bool (or 0/1 integers), got {cond_mask.dtype}")
    return B, N


def _check_memory(gpt, B: int, rows: int, N: int) -> None:
    """Refuse a batch whose KV cache + workspaces do not fit; a cache that must grow is released first."""
    weight = gpt.output.weight
    T = gpt.config.cls_token_num
    resident = bool(gpt.caches) and gpt.cache_rows >= rows and gpt.cache_len >= T + N and \
        gpt.caches[0].k.dtype == weight.dtype and gpt.caches[0].k.device == weight.device
    if gpt.caches and not resident:
        gpt.release_caches()  # setup_caches would otherwise hold the old and the new cache at once
    need = estimate_generation_bytes(gpt.config, batch=B, rows=rows, num_tokens=N, dtype=weight.dtype,
                                     cache_resident=resident)
    check_fits(need, weight.device, f"batch {B} ({rows} cache rows x {T + N} positions, KV cache + sampling "
                                    f"workspace)")


# ---- STOPGAP: per-image keys (`seeds=`) until guided_sample draws from Philox with one key per row. -------------
# Each row samples with its own torch.Generator seeded from seeds[r], one guided_sample call per row, so a row's
# draws never depend on the other rows. Slow (B calls per token, no graph sampling); the engine replaces these two
# helpers with `guided_sample(..., seeds=seeds, offset=...)`.
def _stopgap_row_generators(seeds, batch: int, device, seed, generator) -> Optional[list]:
    if seeds is None:
        return None
    if seed is not None or generator is not None:
        raise InvalidArgument("give seeds (one key per image) or seed / generator, not both")
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or tuple(seeds.shape) != (batch,):
        raise InvalidArgument(f"seeds must be a LongTensor [{batch}] (one key per image, seeding.row_keys), got "
                              f"{getattr(seeds, 'dtype', type(seeds).__name__)} {list(getattr(seeds, 'shape', []))}")
    if bool((seeds < 0).any()):
        raise InvalidArgument("seeds must be non-negative int64 keys")
    return [torch.Generator(device=device).manual_seed(int(k)) for k in seeds.tolist()]


def _stopgap_sample_rows(row_generators: list):
    def sample(cond, uncond, weak, *, generator, return_mixed, **knobs):
        def row(t, r):
            return t[r:r + 1] if isinstance(t, torch.Tensor) and t.dim() >= 1 else t
        outs = [guided_sample(row(cond, r), row(uncond, r), row(weak, r), generator=g, return_mixed=return_mixed,
                              **{k: row(v, r) for k, v in knobs.items() if k != "mode"}, mode=knobs["mode"])
                for r, g in enumerate(row_generators)]
        if not return_mixed:
            return torch.cat(outs)
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    return sample
# ---- end STOPGAP -------------------------------------------------------------------------------------------------


def _scalar_knobs(*values) -> bool:
    return not any(isinstance(v, torch.Tensor) for v in values)


@torch.inference_mode()
def generate(
    gpt,
    cond: torch.Tensor,
    *,
    cond_mask: Optional[torch.Tensor] = None,
    num_tokens: Optional[int] = None,
    guidance: Optional[GuidanceConfig] = None,
    mode: Optional[str] = None,
    schedule=None,
    cfg_scale=None,
    cfg_interval: Optional[int] = None,
    temperature=None,
    top_k=None,
    top_p=None,
    w2s_scale=None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    seeds: Optional[torch.Tensor] = None,
    weak_model=None,
    progress: bool = False,
    on_step: Optional[Callable[[StepRecord], None]] = None,
    return_stats: bool = False,
    engine: str = "auto",
    compact_rows: bool = True,
):
    """Sample image tokens [B, N] for conditions `cond` (class ids [B] or caption features [B, T, C] + cond_mask).

    Guidance: `guidance` (a GuidanceConfig; default GuidanceConfig(), LlamaGen's c2i demo: cfg 4.0, top_k 2000,
    temperature 1, top_p 1), with any of the individual knobs (mode, schedule, cfg_scale, ...) given here
    overriding its fields. top_k larger than the vocabulary means the full vocabulary.

    Randomness: `seeds` (LongTensor [B], one key per image, see `seeding.row_keys`) makes image r depend on
    seeds[r] alone, whatever the batch; `seed` / `generator` seed the whole batch.
    """
    overrides = dict(mode=mode, schedule=schedule, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                     temperature=temperature, top_k=top_k, top_p=top_p, w2s_scale=w2s_scale)
    if guidance is not None and not isinstance(guidance, GuidanceConfig):
        raise InvalidArgument(f"guidance must be a GuidanceConfig, got {type(guidance).__name__}")
    guidance = (guidance or GuidanceConfig()).replace(**{k: v for k, v in overrides.items() if v is not None})
    cfg_scale, cfg_interval, w2s_scale = guidance.cfg_scale, guidance.cfg_interval, guidance.w2s_scale
    temperature, top_k, top_p = guidance.temperature, guidance.top_k, guidance.top_p
    B, N = _check_args(gpt, cond, cond_mask, num_tokens, cfg_scale, cfg_interval, w2s_scale, temperature, top_k,
                       top_p, seed, generator)
    if engine not in ENGINES:
        raise InvalidArgument(f"engine must be one of {ENGINES}, got {engine!r}")
    modes = guidance.token_modes(N)
    uses_uncond = needs_uncond(modes)
    all_rows_always = uses_uncond and not compact_rows  # LlamaGen: compute the uncond half, discard if unneeded
    uses_weak = needs_weak(modes)
    if uses_weak:
        if weak_model is None:
            raise InvalidArgument("modes 'fast' and 'slow' need a weak_model (train one with `llamagen-core2 reflect`)")
        if not (callable(getattr(weak_model, "start", None)) and callable(getattr(weak_model, "step", None))):
            raise InvalidArgument(f"weak_model must have start(gpt, cond, cond_mask) and step(hidden, index) "
                                  f"(e.g. a WeakModel), got {type(weak_model).__name__}")
        if hasattr(weak_model, "check_compatible"):
            weak_model.check_compatible(gpt)

    device = gpt.output.weight.device
    row_generators = _stopgap_row_generators(seeds, B, device, seed, generator)
    if generator is None and row_generators is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed) if seed is not None else int(torch.seed() % (2 ** 63)))
    T = gpt.config.cls_token_num
    rows_total = 2 * B if uses_uncond else B
    _check_memory(gpt, B, rows_total, N)
    gpt.setup_caches(rows_total, T + N)
    use_static = engine == "static" or (engine == "auto" and device.type == "cuda")
    decoder = StaticDecoder.for_model(gpt) if use_static else None
    graph_sampling = False
    user_generator = generator
    if decoder is not None:
        decoder.prepare(B, None if cond_mask is None else cond_mask.to(device=device, dtype=torch.bool))
        graph_sampling = (row_generators is None and on_step is None and not uses_weak
                          and _scalar_knobs(cfg_scale, w2s_scale, temperature, top_k, top_p)
                          and decoder.graph_sampling_ok(generator))
        if graph_sampling:
            generator = decoder.adopt_generator(user_generator)
    stats = GenerationStats()
    cond_rows, uncond_rows, all_rows = slice(0, B), slice(B, 2 * B), slice(0, 2 * B)

    cond = cond.to(device)
    prefix_c = gpt.condition_embeddings(cond)  # [B, T, d]
    prefix_u = gpt.condition_embeddings(gpt.null_condition(B, cond)) if uses_uncond else None
    mask_c = None if cond_mask is None else cond_mask.to(device=device, dtype=torch.bool)
    mask_both = None if mask_c is None else torch.cat([mask_c, mask_c])
    tokens = torch.zeros(B, N, dtype=torch.long, device=device)
    uncond_filled = 0  # positions of the uncond rows present in the cache
    finite = torch.ones((), dtype=torch.bool, device=device)

    def uncond_inputs(a: int, b: int) -> torch.Tensor:
        """Uncond-row embeddings for positions a..b-1: null prefix, then the already sampled tokens."""
        parts = []
        if a < T:
            parts.append(prefix_u[:, a:min(b, T)])
        if b > T:
            parts.append(gpt.embed_tokens(tokens[:, max(a, T) - T:b - T]))
        return torch.cat(parts, dim=1)

    if uses_weak:
        weak_model.start(gpt, cond, cond_mask=mask_c)

    sample_knobs = dict(cfg_scale=cfg_scale, w2s_scale=w2s_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    bar = tqdm(total=N, disable=not progress, desc="tokens", leave=False)
    for i in range(N):
        m = modes[i]
        need_u = MODE_TABLE[m].uncond
        run_u = need_u or all_rows_always  # the uncond rows are computed at this step
        start = 0 if i == 0 else T + i - 1  # first position fed at this step
        if run_u and uncond_filled < start:
            # Catch-up prefill: the uncond rows skipped positions uncond_filled..start-1.
            h = gpt.forward_hidden(uncond_inputs(uncond_filled, start), uncond_filled, rows=uncond_rows,
                                   prefix_valid=mask_c)
            finite &= torch.isfinite(h[:, -1]).all()
            stats.catchup_rows += B * (start - uncond_filled)
            stats.catchup_calls += 1
        sampled = None
        if decoder is not None and i > 0:
            # Static-shape step on rows 0:R only (R = B when the uncond half is not needed: row compaction).
            R = 2 * B if run_u else B
            knobs = dict(mode=m, **sample_knobs) if graph_sampling else None
            hidden, logits, sampled = decoder.step(tokens[:, i - 1], start, R, sample=knobs)
            h_c, logits_c = hidden[:B], logits[:B]
            h_u, logits_u = (hidden[B:], logits[B:]) if need_u else (None, None)
            if run_u:
                uncond_filled = T + i
        else:
            x_c = prefix_c if i == 0 else gpt.embed_tokens(tokens[:, i - 1:i])
            if run_u:
                x_u = prefix_u if i == 0 else x_c
                h = gpt.forward_hidden(torch.cat([x_c, x_u]), start, rows=all_rows, prefix_valid=mask_both)[:, -1]
                h_c, h_u = h[:B], (h[B:] if need_u else None)
                uncond_filled = T + i if i > 0 else T
            else:
                h_c = gpt.forward_hidden(x_c, start, rows=cond_rows, prefix_valid=mask_c)[:, -1]
                h_u = None
            # A fast step samples from the weak prediction alone: skip the (unused) base head on the cond rows.
            logits_c = None if m == "fast" else gpt.head(h_c)
            logits_u = None if h_u is None else gpt.head(h_u)
        stats.step_rows.append(2 * B if run_u else B)
        finite &= torch.isfinite(h_c).all()
        weak_logits = None
        if uses_weak:
            weak_logits = weak_model.step(h_c, i)
            stats.weak_steps += 1
        if sampled is not None:  # sampled inside the CUDA graph
            next_tokens, mixed = sampled, None
        else:
            if m == "fast":  # out = w: sample the weak prediction as a plain conditional row
                logits_c, logits_u, weak_for_mix, mix_mode = weak_logits, None, None, "cond"
            else:
                weak_for_mix, mix_mode = weak_logits, m
            sample = guided_sample if row_generators is None else _stopgap_sample_rows(row_generators)
            result = sample(logits_c, logits_u, weak_for_mix, mode=mix_mode, cfg_scale=cfg_scale,
                            w2s_scale=w2s_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator, return_mixed=on_step is not None)
            next_tokens, mixed = result if on_step is not None else (result, None)
        tokens[:, i] = next_tokens
        if on_step is not None:
            if decoder is not None:  # static outputs (and `mixed`, which may alias them) are overwritten next step
                h_c, h_u = h_c.clone(), None if h_u is None else h_u.clone()
                mixed = mixed.clone()
            on_step(StepRecord(i, m, next_tokens, h_c, h_u, weak_logits, mixed))
        bar.update(1)
    bar.close()
    if graph_sampling:
        decoder.return_generator(user_generator)
    # One host sync for the whole run: a NaN/inf hidden state anywhere means the tokens are garbage.
    if not bool(finite):
        raise FloatingPointError("non-finite hidden states (NaN/inf) during generation; check the checkpoint, "
                                 "dtype (try float32) and scales")
    return (tokens, stats.as_dict()) if return_stats else tokens
