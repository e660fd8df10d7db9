"""Jacobi decoding: the tokens of sequential decoding in fewer base-model forward passes.

Contract (why the tokens are the sequential ones: docs/decoding.md):
  * Token j of image i is the winner of a race whose noise is fixed by (the image's Philox key, j) (counters j*V..,
    docs/sampling.md), so the token sampled at index j is a function of the logits there alone, and those depend
    only on tokens 0..j-1.
  * A pass: with every image's tokens final below its frontier, and a = the batch's smallest frontier, feed token
    a-1 and the current guesses for a..a+W-2 at positions T+a-1.. in ONE forward (base rows, uncond rows when the
    mode needs them, the weak model over the same window) and re-sample all W outputs, each with its own fixed
    noise (token a+k: counters (a+k)*V..). Token a+k becomes final when every token it read (a..a+k-1) was final
    already or a guess equal to the new sample there; token a always does. Final tokens never change; the new
    samples past an image's frontier are its next guesses (plain Jacobi iteration).
  * The batch advances together: a window starts at the batch's smallest frontier, an image that is ahead feeds
    its final tokens again and keeps them (measured against images decoded alone in docs/decoding.md). The batch
    runs until every image is complete; `passes_per_image` records when each image was.
  * Windows never cross a change of mode (`mode_segments`: the row set and the sampler's mode are fixed inside a
    window); before a segment that needs the uncond rows they are caught up as in sequential decoding. Every
    window of a segment has the same width (one CUDA graph per width): one that would pass the segment's end
    starts earlier and feeds final tokens again (`window_bounds`).
  * KV entries: a query at position p reads keys <= p only. The next window starts at position T + a' - 1 (a' the
    new smallest frontier) and rewrites every position from there on before any query reads it, so entries of
    rejected guesses are never read; the entries kept are those whose inputs were final. The weak model's cache
    follows the same rule (its input at position T + i is the base cond hidden state of token i).
  * The first pass is the prefill: the condition prefix and guesses for tokens 0..W-2 in one forward.
  * Guesses for tokens never predicted yet: `GUESSES` ("left": the last predicted token; "above": the token one
    grid row up; "zero"); measured in docs/decoding.md.
  * `run_eager` (host positions, the plain loop) and `run_static` (on an `engine.Engine`: device positions, the
    acceptance on the device, windows captured as CUDA graphs on a GPU, `engine.passes_per_graph` passes per
    replay and one host read of the frontier per replay) share every piece of math below and give the same
    tokens and pass counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import InvalidArgument, check_int
from ..guidance.sampling import filter_flags, guided_sample
from .engine import Request
from .step import EagerSetup, GenerationStats, catch_up_uncond, mode_logits, prefill_inputs, weak_ops_kwargs

DECODINGS = ("sequential", "jacobi")
GUESSES = ("left", "above", "zero")
DEFAULT_WINDOW = 16


@dataclass(frozen=True)
class JacobiSettings:
    window: int = DEFAULT_WINDOW  # tokens predicted per forward pass (positions fed per row)
    guess: str = "left"  # first guess of a token no pass has predicted yet (GUESSES)


def check_decoding(decoding, window, guess="left") -> Optional[JacobiSettings]:
    """None for sequential decoding, JacobiSettings for decoding="jacobi"; bad values are refused by name."""
    if decoding not in DECODINGS:
        raise InvalidArgument(f"decoding must be one of {DECODINGS}, got {decoding!r}")
    window = check_int("jacobi_window", window, minimum=1)
    if guess not in GUESSES:
        raise InvalidArgument(f"jacobi_guess must be one of {GUESSES}, got {guess!r}")
    return JacobiSettings(window, guess) if decoding == "jacobi" else None


@dataclass(frozen=True)
class Segment:
    """Tokens start..end-1, all decoded with `mode`."""
    start: int
    end: int
    mode: str


def mode_segments(modes: list[str]) -> list[Segment]:
    """Maximal runs of one mode in the per-token plan; a window never crosses from one to the next."""
    segments, start = [], 0
    for i in range(1, len(modes) + 1):
        if i == len(modes) or modes[i] != modes[start]:
            segments.append(Segment(start, i, modes[start]))
            start = i
    return segments


def window_bounds(segment: Segment, window: int) -> tuple[int, int, int]:
    """(width, lo, hi): a window pass of `segment` predicts `width` tokens from token clamp(a, lo, hi) on.
    Token 0 comes from the prefill pass, so windows start at token >= 1 (their first input is a token, not the
    prefix); width <= 0 means the prefill pass covers the whole segment."""
    lo = max(segment.start, 1)
    width = min(window, segment.end - lo)
    return width, lo, segment.end - width


class WindowState:
    """Device state of one Jacobi request: tokens [B, N] (final below each image's frontier, guesses above),
    frontier [B], the pass counter, the pass at which each image completed, tokens accepted per pass."""

    def __init__(self, tokens: torch.Tensor, frontier: torch.Tensor, passes: torch.Tensor, finish: torch.Tensor,
                 accepted: torch.Tensor, grid: int):
        self.tokens, self.frontier, self.passes, self.finish, self.accepted = tokens, frontier, passes, finish, accepted
        self.grid = grid

    @classmethod
    def allocate(cls, batch: int, num_tokens: int, grid: int, device, *, tokens: Optional[torch.Tensor] = None,
                 max_passes: Optional[int] = None):
        """Fresh buffers; `tokens` [>= B, >= N] may be a caller's buffer (the engine's output). `max_passes`
        (default N) sizes the per-pass log: N passes at most make progress, and a replay of several passes may
        add no-op ones at the end of a segment."""
        tokens = torch.zeros(batch, num_tokens, dtype=torch.long, device=device) if tokens is None else tokens
        long = dict(dtype=torch.long, device=device)
        return cls(tokens, torch.zeros(batch, **long), torch.zeros(1, **long), torch.zeros(batch, **long),
                   torch.zeros(max_passes or num_tokens, **long), grid)

    def view(self, batch: int, num_tokens: int) -> "WindowState":
        """The first `batch` images and `num_tokens` tokens of (larger) buffers, reset for a new request."""
        state = WindowState(self.tokens[:batch, :num_tokens], self.frontier[:batch], self.passes, self.finish[:batch],
                            self.accepted, self.grid)
        for t in (state.tokens, state.frontier, state.passes, state.finish, state.accepted):
            t.zero_()  # guesses start at 0 ("zero"; "left"/"above" of nothing predicted is 0 too)
        return state

    def snapshot(self) -> tuple:
        return tuple(t.clone() for t in (self.tokens, self.frontier, self.passes, self.finish, self.accepted))

    def restore(self, saved: tuple) -> None:
        for t, s in zip((self.tokens, self.frontier, self.passes, self.finish, self.accepted), saved):
            t.copy_(s)

    def accept(self, new: torch.Tensor, start: torch.Tensor) -> None:
        """new [B, W]: samples for tokens start..start+W-1 (start: device int64 [1]). Device-only (no host sync)."""
        B, W = new.shape
        N = self.tokens.shape[1]
        cols = start + torch.arange(W, device=new.device)  # [W]
        old = self.tokens.index_select(1, cols)
        known = cols[None, :] < self.frontier[:, None]  # final before this pass: kept as they are
        read_ok = known | (old == new)  # token start+k read here was final or guessed right
        # token start+k is final iff tokens start..start+k-1 all read right; token start always is
        run = read_ok[:, :W - 1].long().cumprod(1).sum(1)
        reach = torch.maximum(self.frontier, start + 1 + run)
        self.tokens.index_copy_(1, cols, torch.where(known, old, new))
        self.passes.add_(1)
        self.accepted.index_add_(0, self.passes.clamp(max=self.accepted.shape[0]) - 1,
                                 (reach - self.frontier).sum().view(1))
        self.finish.copy_(torch.where((reach >= N) & (self.frontier < N), self.passes, self.finish))
        self.frontier.copy_(reach)

    def fill_guesses(self, predicted_end: torch.Tensor, rule: str) -> None:
        """First guesses for tokens >= predicted_end (device [1]), which no pass has predicted yet."""
        if rule == "zero":
            return  # they are still the zeros `view` wrote
        B, N = self.tokens.shape
        cols = torch.arange(N, device=self.tokens.device)
        unknown = cols[None, :] >= predicted_end  # [1, N]
        last = self.tokens.index_select(1, (predicted_end - 1).clamp(min=0, max=N - 1))  # [B, 1]
        self.tokens.copy_(torch.where(unknown, last, self.tokens))  # "left": the last predicted token
        if rule == "above":  # the token one grid row up where there is one (top-down, so guesses propagate)
            G = self.grid
            for row_start in range(G, N, G):
                block = slice(row_start, min(row_start + G, N))
                self.tokens[:, block] = torch.where(unknown[:, block], self.tokens[:, row_start - G:block.stop - G],
                                                    self.tokens[:, block])


def sample_window(cond: torch.Tensor, uncond: Optional[torch.Tensor], weak: Optional[torch.Tensor], *, mode: str,
                  knobs: dict, keys: torch.Tensor, start: torch.Tensor, vocab: int,
                  backend: Optional[str], filters: tuple) -> torch.Tensor:
    """The one place a window is sampled: logits [B, W, V] (None where the mode has none) -> tokens [B, W].

    Position k of image b draws with the image's key and the counters of token start + k ((start + k) * V..), the
    noise sequential decoding gives that token: one sampler call over the B*W rows (row b*W + k), keys and per-image
    knobs repeated, one counter base per row. The knobs and keys were validated at generate()'s entry; `filters` is
    the request's (top_k_on, top_p_on), read once on the host (guidance.sampling.filter_flags)."""
    B, W, V = cond.shape

    def rows(logits):
        return None if logits is None else logits.reshape(B * W, V)

    def per_row(value):  # a per-image tensor knob [B] -> [B*W]; numbers stay numbers
        return value.repeat_interleave(W) if isinstance(value, torch.Tensor) and value.dim() == 1 else value

    offsets = ((start + torch.arange(W, device=cond.device)) * vocab).repeat(B)  # [B*W] device
    tokens = guided_sample(rows(cond), rows(uncond), rows(weak), mode=mode,
                           **{name: per_row(value) for name, value in knobs.items()},
                           seeds=keys.repeat_interleave(W), offset=offsets, check_values=False, backend=backend,
                           filters=filters)
    return tokens.view(B, W)


def finish_pass(gpt, state: WindowState, mode: str, hidden: torch.Tensor, weak_hidden: Optional[torch.Tensor],
                start: torch.Tensor, *, knobs: dict, keys: torch.Tensor, backend: Optional[str], filters: tuple,
                guess: str) -> None:
    """hidden [R, W, d] (the window's outputs, cond rows first), weak_hidden [B, W, d] | None -> sample, accept,
    next guesses. Shared by both runners; device-only."""
    B = state.tokens.shape[0]
    cond, uncond, weak, sample_mode, _ = mode_logits(gpt, mode, B, hidden, weak_hidden)
    new = sample_window(cond, uncond, weak, mode=sample_mode, knobs=knobs, keys=keys, start=start,
                        vocab=gpt.config.vocab_size, backend=backend, filters=filters)
    state.accept(new, start)
    state.fill_guesses(start + new.shape[1], guess)


def _window_inputs(gpt, tokens, start, width: int, two_halves: bool) -> torch.Tensor:
    """Token start-1 (final) and the guesses for start..start+width-2 -> embeddings [R, width, d]."""
    x = gpt.embed_tokens(tokens.index_select(1, start - 1 + torch.arange(width, device=tokens.device)))
    return torch.cat([x, x]) if two_halves else x


def _complete(stats: GenerationStats, state: WindowState) -> GenerationStats:
    """Copy the device pass counts into the stats (one host sync)."""
    passes = int(state.passes)
    stats.forward_passes = passes
    stats.passes_per_image = state.finish.tolist()
    stats.accepted_per_pass = state.accepted[:passes].tolist()
    return stats


# ---------------------------------------------------------------------- eager: host positions
def run_eager(gpt, cond, cond_mask, modes, keys, knobs, weak, compact_rows, settings: JacobiSettings, bar):
    """The plain loop (host positions; reads the frontier on the host after every pass) -> (tokens, stats, finite)."""
    B, N = cond.shape[0], len(modes)
    T = gpt.config.cls_token_num
    device = gpt.output.weight.device
    setup = EagerSetup.prepare(gpt, cond, cond_mask, modes, weak, compact_rows)
    cache, weak_cache, prefix_u = setup.cache, setup.weak_cache, setup.prefix_uncond
    state = WindowState.allocate(B, N, gpt.config.grid_size, device).view(B, N)
    finite = torch.ones((), dtype=torch.bool, device=device)
    stats = GenerationStats()
    filters = filter_flags(knobs["temperature"], knobs["top_k"], knobs["top_p"], gpt.config.vocab_size)
    common = dict(knobs=knobs, keys=keys, backend=None, filters=filters, guess=settings.guess)

    def run_pass(x, start: int, mode: str) -> None:
        nonlocal finite
        width = x.shape[1] - (T - 1 if start == 0 else 0)
        hidden = gpt.forward_hidden(x, cache, start=0 if start == 0 else T + start - 1)[:, -width:]
        finite &= torch.isfinite(hidden).all()
        weak_hidden = None
        if weak is not None:  # stepped over every window so its cache has no holes
            weak_hidden = weak.window_hidden(hidden[:B], weak_cache, start=T + start)
            finite &= torch.isfinite(weak_hidden).all()
            stats.weak_steps += width
        stats.step_rows.append(x.shape[0] * width)
        finish_pass(gpt, state, mode, hidden, weak_hidden, torch.tensor([start], device=device), **common)

    segments = mode_segments(modes)
    first = segments[0]
    two = setup.runs_uncond(first.mode)
    width0 = min(settings.window, first.end)
    run_pass(prefill_inputs(gpt, setup.prefix_cond, prefix_u, state.tokens[:, :width0 - 1], two), 0, first.mode)
    uncond_filled = 0
    done = 0
    for segment in segments:
        width, lo, hi = window_bounds(segment, settings.window)
        two = setup.runs_uncond(segment.mode)
        if two and uncond_filled < T + segment.start - 1:  # catch-up prefill over the positions the uncond rows skipped
            finite &= catch_up_uncond(gpt, cache, prefix_u, state.tokens, uncond_filled, T + segment.start - 1, stats)
        a = int(state.frontier.min())
        while a < segment.end:
            start = min(max(a, lo), hi)
            run_pass(_window_inputs(gpt, state.tokens, torch.tensor([start], device=device), width, two), start,
                     segment.mode)
            a = int(state.frontier.min())
            bar.update(a - done)
            done = a
        if two:
            uncond_filled = T + segment.end - 1
    bar.update(N - done)
    return state.tokens, _complete(stats, state), finite


# ---------------------------------------------------------------------- static: an Engine's state, device positions
def _engine_state(engine, batch: int, num_tokens: int) -> WindowState:
    """The engine-owned Jacobi buffers (fixed addresses for its graphs), reallocated with its other buffers."""
    held = engine.jacobi_buffers
    if held is None or held[0] != engine.binding:
        tokens = engine.buffers.tokens_out
        cap_rows, cap_len = tokens.shape
        buffers = WindowState.allocate(cap_rows, cap_len, engine.gpt.config.grid_size, engine.device,
                                       tokens=tokens, max_passes=cap_len * engine.passes_per_graph)
        engine.jacobi_buffers = held = (engine.binding, buffers)
    return held[1].view(batch, num_tokens)


def run_static(engine, request: Request, modes: list[str], settings: JacobiSettings, progress_bar):
    """Jacobi decoding on `engine`'s state (after `engine.begin_request`, inside `engine.on_device()`) ->
    (tokens [B, N] view, stats)."""
    gpt = engine.gpt
    B, N, weak, backend = request.batch, request.num_tokens, request.weak, request.backend
    T = gpt.config.cls_token_num
    state = _engine_state(engine, B, N)
    stats = GenerationStats()
    common = dict(knobs=request.knobs, keys=request.keys, backend=backend, filters=request.filters,
                  guess=settings.guess)
    segments = mode_segments(modes)
    windows = [(segment, *window_bounds(segment, settings.window)) for segment in segments]
    # the fused decode-layer kernels of every window shape, decided before any capture
    engine.prepare_decode_ops(request, {(gpt, request.rows(segment.mode), width) for segment, width, _, _ in windows}
                              | {(weak, B, width) for _, width, _, _ in windows})

    # ---- the prefill pass (eager, host positions): prefix + guesses for tokens 0..W0-2
    first = segments[0]
    width0 = min(settings.window, first.end)
    two = request.rows(first.mode) == 2 * B
    hidden, weak_hidden = engine.prefill(request, state.tokens[:, :width0 - 1], two)
    if weak is not None:
        stats.weak_steps += width0
    stats.step_rows.append(hidden.shape[0] * width0)
    finish_pass(gpt, state, first.mode, hidden, weak_hidden, torch.zeros(1, dtype=torch.long, device=engine.device),
                **common)

    # ---- window passes, segment by segment; the host reads the frontier once per replay
    uncond_filled, done = 0, 0
    per_replay = engine.passes_per_graph
    for segment, width, lo, hi in windows:
        rows = request.rows(segment.mode)
        if rows == 2 * B and uncond_filled < T + segment.start - 1:
            engine.catch_up(request, uncond_filled, T + segment.start - 1, stats)
        a = int(state.frontier.min())
        while a < segment.end:
            max_end, weak_end = _key_bounds(engine, a, width, hi, per_replay, weak)

            def replay(mode=segment.mode, width=width, lo=lo, hi=hi, rows=rows, max_end=max_end, weak_end=weak_end):
                for _ in range(per_replay):
                    _window_pass(engine, request, state, mode, rows, width, lo, hi, max_end, weak_end, common)

            if request.graphs:
                key = ("jacobi", segment.mode, B, N, rows, width, lo, hi, per_replay, max_end, weak_end,
                       engine.cache.masked, settings.guess, request.ops_key(gpt, rows, width), request.filters)
                engine.graphs.run(key, replay, lambda: (state.snapshot(), request.finite.clone()),
                                  lambda saved: (state.restore(saved[0]), request.finite.copy_(saved[1])))
            else:
                replay()
            stats.step_rows.extend([rows * width] * per_replay)
            if weak is not None:
                stats.weak_steps += width * per_replay
            a = int(state.frontier.min())
            if progress_bar is not None:
                progress_bar.update(a - done)
            done = a
        if rows == 2 * B:
            uncond_filled = T + segment.end - 1
    if progress_bar is not None:
        progress_bar.update(N - done)
    return state.tokens, _complete(stats, state)


def _key_bounds(engine, a: int, width: int, hi: int, passes: int, weak) -> tuple[int, int]:
    """Host bounds of the keys the next `passes` window passes may read (base, weak): windows start at most
    min(hi, a + (passes - 1) * width) and read keys up to their last position; rounded up to the engine's bucket
    so few distinct graphs are captured."""
    T = engine.gpt.config.cls_token_num
    last_start = min(hi, a + (passes - 1) * width)
    end = T + last_start + width - 1  # one past the last position fed
    end = min(math.ceil(end / engine.bucket) * engine.bucket, T + hi + width - 1, engine.cache.max_len)
    weak_end = min(end + 1, engine.weak_cache.max_len) if weak is not None else 0
    return end, weak_end


def _window_pass(engine, request: Request, state: WindowState, mode: str, rows: int, width: int, lo: int, hi: int,
                 max_end: int, weak_end: int, common: dict) -> None:
    """One window pass on device state only (capturable): start = clamp(smallest frontier, lo, hi)."""
    gpt, B, weak, backend = engine.gpt, request.batch, request.weak, request.backend
    T = gpt.config.cls_token_num
    start = state.frontier.amin().clamp(min=lo, max=hi).view(1)
    x = _window_inputs(gpt, state.tokens, start, width, rows == 2 * B)
    hidden = gpt.forward_hidden(x, engine.cache, position=start + (T - 1), max_end=max_end, backend=backend,
                                decode_ops=request.ops_for(gpt, rows, width))
    finite = torch.isfinite(hidden).all()
    weak_hidden = None
    if weak is not None:
        weak_hidden = weak.window_hidden(hidden[:B], engine.weak_cache, position=start + T, max_end=weak_end,
                                         backend=backend, **weak_ops_kwargs(request.ops_for(weak, B, width)))
        finite = finite & torch.isfinite(weak_hidden).all()
    request.finite.logical_and_(finite)
    finish_pass(gpt, state, mode, hidden, weak_hidden, start, **common)
