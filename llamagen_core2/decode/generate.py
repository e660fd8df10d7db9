"""Batched AR image-token generation: `generate(gpt, cond, ...) -> LongTensor [B, N]`.

Contract:
  * Guidance: a `GuidanceConfig` (mode or schedule, cfg_scale, cfg_interval, w2s_scale, temperature, top_k, top_p;
    defaults = LlamaGen's c2i demo) plus per-knob overrides. Per-token modes: cond: c; cfg: u + s (c - u);
    fast: w; slow: w + a (cfg - w) (w = weak-model prediction, a = w2s_scale). `cfg_interval` follows LlamaGen:
    CFG for tokens 0..cfg_interval+1, cond-only afterwards (-1 = always).
  * Rows of the KV cache are laid out [cond (0:B); uncond (B:2B)] as in LlamaGen; the same sampled token feeds
    both halves. A step that does not need the uncond half (cond, fast, CFG past cfg_interval) runs rows 0:B only;
    before a later step needs them again the uncond rows are caught up by one chunked prefill, so attention never
    reads empty cache entries. `compact_rows=False` reproduces LlamaGen instead (all 2B rows on every step once
    any token needs the uncond half) -- the reference the row compaction is tested against.
  * Randomness: image i samples with the Philox key `seeds[i]` (`guidance/seeding.py`: from `seed` / `generator` /
    a list of generators, or given directly as `seeds`); token j draws counters j*V.. . So the same seed gives the same
    image i at any batch size and under either engine.
  * Engines: "static" decodes through `engine.Engine` (caller-owned state, fixed-shape steps, every mode inside
    CUDA graphs on GPU, eager on CPU). The string builds a fresh Engine for the call, so on a GPU its graphs are
    captured again every call: pass the same `Engine(gpt)` to every call to keep buffers and graphs (the
    pipeline does).
    "eager" is the plain loop below (host positions, one forward + sample per token): the oracle the static
    engine is tested against. "auto" = static on CUDA, eager elsewhere. Both give the same tokens.
  * Before allocating, the KV cache + workspaces are checked against the device's free memory (`Engine.check_memory`,
    `memory.check_generation_fits`).
  * NaN/inf in any hidden state (base rows, weak predictions) is accumulated on the device and raised once at
    the end (FloatingPointError).
  * Decoding: "sequential" (one forward pass per token, the default) or "jacobi" (`jacobi.py`, docs/decoding.md):
    windows of `jacobi_window` tokens per forward pass that return the sequential tokens (the per-token noise is
    fixed) in fewer passes, on either engine.

Weak model (CoRe^2, core2/weak_model.py): stepped at every token whenever any token uses fast/slow, so its own cache
never has holes; its hidden prediction goes through the frozen base head.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..errors import InvalidArgument, check_int
from ..guidance.config import MODE_TABLE, GuidanceConfig, needs_uncond, needs_weak, require_weak, sampler_inputs
from ..guidance.sampling import guided_sample
from ..guidance.seeding import row_keys
from .engine import Engine
from .jacobi import DEFAULT_WINDOW, check_decoding, run_eager as run_jacobi_eager, run_static as run_jacobi_static
from .memory import check_generation_fits
from .step import EagerSetup, GenerationStats, StepRecord, catch_up_uncond

ENGINES = ("auto", "static", "eager")


def _check_args(gpt, cond, cond_mask, num_tokens, guidance: GuidanceConfig) -> tuple[int, int]:
    B = gpt.check_condition(cond, cond_mask=cond_mask)
    c = gpt.config
    N = c.num_image_tokens if num_tokens is None else check_int("num_tokens", num_tokens, minimum=1,
                                                                maximum=c.num_image_tokens)
    for name in ("cfg_scale", "w2s_scale", "temperature", "top_k", "top_p"):
        value = getattr(guidance, name)
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] != B:
            raise InvalidArgument(f"{name} must be a number or a tensor of shape [{B}] (one per image), "
                                  f"got shape {list(value.shape)}")
    return B, N


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
    generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
    seeds: Optional[torch.Tensor] = None,
    weak_model=None,
    progress=False,
    on_step: Optional[Callable[[StepRecord], None]] = None,
    return_stats: bool = False,
    engine: Union[str, Engine] = "auto",
    compact_rows: bool = True,
    decoding: str = "sequential",
    jacobi_window: int = DEFAULT_WINDOW,
    jacobi_guess: str = "left",
):
    """Sample image tokens [B, N] for conditions `cond` (class ids [B] or caption features [B, T, C] + cond_mask).

    Guidance: `guidance` (default GuidanceConfig(): cfg 4.0, top_k 2000, temperature 1, top_p 1) with any of the
    individual knobs given here overriding its fields; top_k larger than the vocabulary = the full vocabulary.
    Randomness: `seed`, one `generator` or a list of B generators (one per image), or per-image Philox keys
    `seeds` [B] directly (`seeding.row_keys`); none of them = a fresh random seed.
    Decoding: "sequential" (one forward pass per token) or "jacobi" (jacobi.py: windows of `jacobi_window` tokens
    per forward pass, the same tokens in fewer passes; `jacobi_guess` = first guess of unpredicted tokens; no
    `on_step`). `return_stats=True` reports forward_passes (per batch, per image, mean) and accepted_per_pass.
    `progress`: True draws a "tokens" bar on stderr that ends at N/N; a progress bar object (anything with
    `update(n)`, e.g. a tqdm bar) is advanced by one per token instead, so one bar can span several calls.
    """
    overrides = dict(mode=mode, schedule=schedule, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                     temperature=temperature, top_k=top_k, top_p=top_p, w2s_scale=w2s_scale)
    if guidance is not None and not isinstance(guidance, GuidanceConfig):
        raise InvalidArgument(f"guidance must be a GuidanceConfig, got {type(guidance).__name__}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    guidance = guidance or GuidanceConfig()
    if overrides:  # a GuidanceConfig was validated when it was built: only a changed one is built (and checked) again
        guidance = guidance.replace(**overrides)
    B, N = _check_args(gpt, cond, cond_mask, num_tokens, guidance)
    jacobi = check_decoding(decoding, jacobi_window, jacobi_guess)
    if jacobi is not None and on_step is not None:
        raise InvalidArgument("on_step records sequential decoding steps (Collect uses it); decoding='jacobi' has "
                              "no such steps: use decoding='sequential' with on_step")
    if not isinstance(engine, Engine) and engine not in ENGINES:
        raise InvalidArgument(f"engine must be one of {ENGINES} or an Engine, got {engine!r}")
    if isinstance(engine, Engine) and engine.gpt is not gpt:
        raise InvalidArgument("this Engine was built for another model; make one with Engine(gpt)")
    if seeds is not None:
        if seed is not None or generator is not None:
            raise InvalidArgument("give seeds (one key per image) or seed / generator, not both")
        if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or tuple(seeds.shape) != (B,):
            raise InvalidArgument(f"seeds must be a LongTensor [{B}] (one key per image, seeding.row_keys), got "
                                  f"{getattr(seeds, 'dtype', type(seeds).__name__)} "
                                  f"{list(getattr(seeds, 'shape', []))}")
        if seeds.device.type == "cpu" and bool((seeds < 0).any()):  # device keys are the caller's contract
            raise InvalidArgument("seeds must be non-negative int64 keys")
        keys = seeds
    else:
        keys = row_keys(B, seed=seed, generator=generator)
    modes = guidance.token_modes(N)
    uses_uncond, uses_weak = needs_uncond(modes), needs_weak(modes)
    require_weak(modes, weak_model)
    if uses_weak:
        if not all(callable(getattr(weak_model, name, None)) for name in ("new_cache", "prefill", "step_hidden")):
            raise InvalidArgument(f"weak_model must have new_cache(rows), prefill(cond, cache, cond_mask) and "
                                  f"step_hidden(hidden, cache, ...) (e.g. a WeakModel), got "
                                  f"{type(weak_model).__name__}")
        if hasattr(weak_model, "check_compatible"):
            weak_model.check_compatible(gpt)

    device = gpt.output.weight.device
    static = isinstance(engine, Engine) or engine == "static" or (engine == "auto" and device.type == "cuda")
    state = engine if isinstance(engine, Engine) else (Engine(gpt) if static else None)
    rows, window = 2 * B if uses_uncond else B, 1 if jacobi is None else jacobi.window
    if state is not None:
        state.check_memory(B, rows, N, window)
    else:
        check_generation_fits(gpt, batch=B, rows=rows, num_tokens=N, positions_per_pass=window)
    # A bar of its own ends drawn at N/N and stays (tqdm redraws at most every 0.1 s: close() draws the last state).
    own_bar = not hasattr(progress, "update")
    bar = tqdm(total=N, disable=not progress, desc="tokens", unit="token") if own_bar else progress
    weak = weak_model if uses_weak else None
    if state is not None:
        tokens, stats, finite = _run_static(state, cond, cond_mask, modes, keys, guidance, weak, compact_rows,
                                            on_step, bar, jacobi)
    elif jacobi is not None:
        tokens, stats, finite = run_jacobi_eager(gpt, cond, cond_mask, modes, keys.to(device),
                                                 guidance.sampling_knobs(), weak, compact_rows, jacobi, bar)
    else:
        tokens, stats, finite = _run_eager(gpt, cond, cond_mask, modes, keys.to(device), guidance, weak,
                                           compact_rows, on_step, bar)
    if own_bar:
        bar.close()
    # One host sync for the whole run: a NaN/inf hidden state anywhere means the tokens are garbage.
    if not bool(finite):
        raise FloatingPointError("non-finite hidden states (NaN/inf) during generation (base model or weak model); "
                                 "check the checkpoints, the dtype (try float32) and the scales")
    return (tokens, stats.as_dict()) if return_stats else tokens


def _run_static(state: Engine, cond, cond_mask, modes, keys, guidance, weak, compact_rows, on_step, bar, jacobi):
    with state.on_device():
        request = state.begin_request(cond, cond_mask, modes, keys, guidance.sampling_knobs(), weak, compact_rows)
        if jacobi is None:
            tokens, stats = state.decode(request, modes, on_step=on_step, progress_bar=bar)
        else:
            tokens, stats = run_jacobi_static(state, request, modes, jacobi, bar)
    return tokens.clone(), stats, request.finite.clone()


def _run_eager(gpt, cond, cond_mask, modes, keys, guidance, weak, compact_rows, on_step, bar):
    """The plain loop: host positions, one forward + one sample per token (the static engine's oracle)."""
    B, N = cond.shape[0], len(modes)
    T, V = gpt.config.cls_token_num, gpt.config.vocab_size
    device = gpt.output.weight.device
    setup = EagerSetup.prepare(gpt, cond, cond_mask, modes, weak, compact_rows)
    cache, weak_cache, prefix_c, prefix_u = setup.cache, setup.weak_cache, setup.prefix_cond, setup.prefix_uncond
    tokens = torch.zeros(B, N, dtype=torch.long, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    stats = GenerationStats()
    uncond_filled = 0  # positions of the uncond rows present in the cache
    knobs = guidance.sampling_knobs()
    for i in range(N):
        m = modes[i]
        spec = MODE_TABLE[m]
        run_u = setup.runs_uncond(m)  # the uncond rows are computed at this step
        start = 0 if i == 0 else T + i - 1  # first position fed at this step
        if run_u and uncond_filled < start:  # catch-up prefill over the positions the uncond rows skipped
            finite &= catch_up_uncond(gpt, cache, prefix_u, tokens, uncond_filled, start, stats)
        x_c = prefix_c if i == 0 else gpt.embed_tokens(tokens[:, i - 1:i])
        x = torch.cat([x_c, prefix_u if i == 0 else x_c]) if run_u else x_c
        hidden = gpt.forward_hidden(x, cache, start=start)[:, -1]  # [R, d]
        if run_u:
            uncond_filled = T + i
        finite &= torch.isfinite(hidden).all()
        stats.step_rows.append(hidden.shape[0])
        h_c = hidden[:B]
        weak_logits = None
        if weak is not None:
            h_w = weak.step_hidden(h_c, weak_cache, start=T + i)
            finite &= torch.isfinite(h_w).all()
            stats.weak_steps += 1
            if spec.weak:
                weak_logits = gpt.head(h_w.to(h_c.dtype))
        # A fast step samples from the weak prediction alone: the base head on the cond rows is skipped.
        logits_c = gpt.head(h_c) if spec.cond_logits else None
        logits_u = gpt.head(hidden[B:2 * B]) if spec.uncond else None
        sample_mode, logits_c, logits_u, logits_w = sampler_inputs(m, logits_c, logits_u, weak_logits)
        result = guided_sample(logits_c, logits_u, logits_w, mode=sample_mode, **knobs, seeds=keys, offset=i * V,
                               return_mixed=on_step is not None, check_values=False)
        next_tokens, mixed = result if on_step is not None else (result, None)
        tokens[:, i] = next_tokens
        if on_step is not None:
            on_step(StepRecord(i, m, next_tokens, h_c, hidden[B:2 * B] if spec.uncond else None, weak_logits, mixed))
        bar.update(1)
    return tokens, stats.sequential(B, N), finite
