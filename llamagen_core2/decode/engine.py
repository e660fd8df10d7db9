"""The decode engine: caller-owned decoding state and one fixed-shape decode step that serves every mode.

Contract (why: docs/design.md#decode-engine):
  * `Engine(gpt)` owns everything decoding keeps between tokens: the base KV cache (rows [cond 0:B; uncond B:2B],
    LlamaGen's CFG layout), the weak model's KV cache, the device buffers the steps read and write
    (`DecodeBuffers`: tokens, the counters, the sampler's per-row knobs and Philox keys, the NaN flag), the split-K
    workspace and the captured CUDA graphs. Nothing lives on the model. Keep one Engine per (model, device) and
    pass it to every `generate(..., engine=engine)` call (LlamaGenPipeline does): buffers and graphs are reused
    while they fit; a larger request reallocates them.
  * Memory: `check_memory` refuses a request whose cache and workspaces cannot fit, releasing a cache that must
    grow first (so the old and the new one are never held at once).
  * A request: inside `engine.on_device()`, `begin_request(...)` fits the caches and buffers to it, loads its keys
    and knobs and returns its `Request` -- the one per-request state: the shape facts, the backend, the sampler's
    flags and select path, the fused decode ops decided for it (the engine keeps the last one as
    `engine.request`). `decode(request, modes)` then decodes it sequentially (Jacobi decoding runs on the same
    state: jacobi.run_static): eager prefill of the condition prefix (and the weak model's), token 0 sampled from
    it, then the per-token plan in chunks of consecutive steps with the same mode and row count.
    Each step is: embed the previous token -> base forward at the device position -> one head GEMM over the rows
    the mode samples from (cond, uncond, weak prediction; fast skips the cond rows) -> the fused sampler -> write
    the token and advance the counters. Nothing in it reads a value on the host, so on CUDA a chunk of K steps is
    captured once as one graph and replayed (K steps = one replay); on CPU the same step runs eagerly.
  * Row compaction: a step whose mode does not need the uncond half runs rows 0:B only; when a later step needs
    the uncond rows again their cache is first caught up by one eager prefill over the positions they missed.
  * Attention reads: with the fused Triton decode-attention kernel the graph does not depend on the position at
    all (the kernel walks keys 0..position read on the device); with the torch reference a chunk stays inside one
    64-position bucket and reads keys up to the bucket's end (at most 63 masked extra keys).
  * Fused decode-layer kernels (decode_ops.py, docs/decode_kernels.md): with the Triton backend, before any
    capture, each group of the layer (add+RMSNorm+QKV+RoPE+KV write, the out GEMM, add+RMSNorm+W1|W3+SwiGLU, W2)
    is decided per trunk shape (base and weak model, each row count and window width of the request) by the
    timed-choice guard: the fused kernel only where it measured faster than today's ops. The decisions are the
    request's (`request.decode_ops`), the split-K workspace they share is the engine's (`workspace`); the flags
    join the graph key.
  * Randomness: the sampler's Philox keys (one per image, `guidance/seeding.py`) and the draw counter (token index
    x V) live in device buffers, so eager, static and graph-replayed decoding draw the same numbers.
  * Sampler: the request's filter flags (which of top-k / top-p any row uses) are read on the host once per
    request and join the graph key, so an unfiltered request's graphs write no logits row to scratch; on CUDA the
    sampler's select path (fused kernel or torch thresholds) is timed once per (batch, V, flags) before capture
    and the faster one is captured (kernels/dispatch.py, kernels/timed_choice.py).
  * The NaN/inf flag accumulates on the device over every hidden state computed (the base rows of every step,
    the weak model's predictions, catch-up prefills); the caller reads it once at the end.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import InvalidArgument
from ..guidance.config import MODE_TABLE, needs_uncond, needs_weak
from ..guidance.sampling import filter_flags, guided_sample
from .decode_ops import DecodeOps, LayerShape
from .kv_cache import KVCache
from .memory import check_generation_fits
from .static_decode import StepGraphs
from .step import (GenerationStats, StepRecord, catch_up_uncond, mode_logits, prefill_inputs, set_up_prefix,
                   weak_ops_kwargs)

BUCKET = 64  # positions per attention-length bucket of the torch reference path
STEPS_PER_GRAPH = 32  # decode steps captured in one CUDA graph (a chunk); shorter runs use powers of two
KNOB_DTYPES = {"cfg_scale": torch.float32, "w2s_scale": torch.float32, "temperature": torch.float32,
               "top_p": torch.float32, "top_k": torch.long}  # the sampler's per-row knobs


def addresses(module) -> tuple:
    """Where a module's tensors live (parameters and buffers, e.g. the RoPE table): graphs recorded them."""
    if module is None:
        return ()
    return tuple(t.data_ptr() for t in (*module.parameters(), *module.buffers()))


def chunk_sizes(length: int, limit: int) -> list[int]:
    """Split a run of `length` steps into chunks: `limit`-sized ones, then powers of two (few distinct graphs)."""
    sizes = [limit] * (length // limit)
    rest = length % limit
    while rest:
        size = 1 << (rest.bit_length() - 1)
        sizes.append(size)
        rest -= size
    return sizes


@dataclass
class Counters:
    """The step counters: one int64 tensor [4] advanced by one add per decode step (`advance`), its slots read as
    named views (each a device tensor [1], so nothing is read on the host)."""
    all: torch.Tensor  # [position, weak_position, token_index, philox_offset]
    step: torch.Tensor  # what one decode step adds: [1, 1, 1, V]

    @classmethod
    def allocate(cls, vocab: int, device) -> "Counters":
        return cls(torch.zeros(4, dtype=torch.long, device=device),
                   torch.tensor([1, 1, 1, vocab], dtype=torch.long, device=device))

    @property
    def position(self) -> torch.Tensor:
        """The base model's sequence position fed at this step."""
        return self.all[0:1]

    @property
    def weak_position(self) -> torch.Tensor:
        """The weak model's position (one ahead of the base's: its input at T + i is h_c of token i)."""
        return self.all[1:2]

    @property
    def token_index(self) -> torch.Tensor:
        """The image token this step samples."""
        return self.all[2:3]

    @property
    def philox_offset(self) -> torch.Tensor:
        """The sampler's counter base: token index x V (seeding rule, docs/sampling.md)."""
        return self.all[3:4]

    def start(self, position: int, weak_position: int, token_index: int, philox_offset: int) -> None:
        self.all.copy_(torch.tensor([position, weak_position, token_index, philox_offset]))

    def advance(self) -> None:
        self.all.add_(self.step)


@dataclass
class DecodeBuffers:
    """Every device buffer the fixed-shape steps read and write, allocated together for the cache's rows and length
    (captured graphs record their addresses, so a request that needs more reallocates them all and drops the
    graphs)."""
    tokens_in: torch.Tensor  # [rows] the token fed at this step, per cache row (the same token feeds both halves)
    tokens_out: torch.Tensor  # [rows, max_len] the sampled image tokens
    counters: Counters
    keys: torch.Tensor  # [rows] int64: the Philox key of each image
    knobs: dict  # the sampler's per-row knobs (KNOB_DTYPES), [rows] each
    finite: torch.Tensor  # bool []: no NaN/inf seen in any hidden state of the request so far
    record: Optional[tuple] = None  # what a step saw, for on_step (Collect): `recorded`

    @classmethod
    def allocate(cls, rows: int, max_len: int, vocab: int, device) -> "DecodeBuffers":
        long = dict(dtype=torch.long, device=device)
        return cls(tokens_in=torch.zeros(rows, **long), tokens_out=torch.zeros(rows, max_len, **long),
                   counters=Counters.allocate(vocab, device), keys=torch.zeros(rows, **long),
                   knobs={name: torch.zeros(rows, dtype=dtype, device=device) for name, dtype in KNOB_DTYPES.items()},
                   finite=torch.ones((), dtype=torch.bool, device=device))

    def recorded(self, dim: int, dtype: torch.dtype, vocab: int) -> tuple:
        """(hidden [rows, d], weak logits [rows, V], mixed logits [rows, V]) fixed buffers, made on first use."""
        if self.record is None:
            rows, device = self.tokens_in.shape[0], self.tokens_in.device
            self.record = (torch.zeros(rows, dim, dtype=dtype, device=device),
                           torch.zeros(rows, vocab, dtype=torch.float32, device=device),
                           torch.zeros(rows, vocab, dtype=torch.float32, device=device))
        return self.record

    def state(self) -> tuple:
        """What a step changes besides its outputs, saved around a graph capture (which runs the steps once)."""
        return self.counters.all.clone(), self.tokens_in.clone(), self.finite.clone()

    def restore(self, saved: tuple) -> None:
        for buffer, value in zip((self.counters.all, self.tokens_in, self.finite), saved):
            buffer.copy_(value)


@dataclass
class Request:
    """One request and everything decided once for it, made by `Engine.begin_request` (shared by sequential and
    Jacobi decoding); `keys`, `knobs` and `finite` are views of the engine's buffers."""
    batch: int
    num_tokens: int
    all_rows_always: bool  # compact_rows=False: the uncond half is computed at every step once any token needs it
    weak: Optional[torch.nn.Module]  # the weak model when any token uses it, else None
    cond: torch.Tensor  # on the device
    mask: Optional[torch.Tensor]  # bool [B, T] on the device, or None
    null_prefix: Optional[torch.Tensor]  # [B, T, d]: the uncond rows' prefix, when any token needs them
    backend: str  # "triton" | "torch", for the block ops and the sampler
    graphs: bool  # steps run as captured CUDA graphs (they need the fused sampler: the torch one syncs)
    keys: torch.Tensor  # [B] Philox keys
    knobs: dict  # the sampler's per-row knobs [B]
    finite: torch.Tensor  # the NaN/inf flag every hidden state of the request is checked into
    filters: tuple  # (top_k_on, top_p_on): which filters any row uses, read once on the host; part of graph keys
    top_k_max: int  # the largest top_k (the torch select path's torch.topk width)
    select: str = "kernel"  # the sampler's select path, timed before capture on CUDA
    decode_ops: dict = field(default_factory=dict)  # LayerShape -> DecodeOps: the fused kernels decided for it

    def rows(self, mode: str) -> int:
        """Base rows a step of `mode` computes: [cond; uncond] when it (or compact_rows=False) needs them."""
        return 2 * self.batch if MODE_TABLE[mode].uncond or self.all_rows_always else self.batch

    def ops_for(self, model, rows: int, width: int) -> Optional[DecodeOps]:
        """The fused decode ops chosen for `model`'s trunk at rows x width, or None (the unfused ops)."""
        if not self.decode_ops or model is None or not hasattr(model, "layers"):
            return None
        ops = self.decode_ops.get(LayerShape.of(model.layers, rows, width))
        return ops if ops is not None and any(ops.key) else None

    def ops_key(self, gpt, rows: int, width: int) -> tuple:
        """The fused-kernel flags of a pass (base, weak): part of its graph key."""
        return tuple(None if ops is None else ops.key
                     for ops in (self.ops_for(gpt, rows, width), self.ops_for(self.weak, self.batch, width)))


class Engine:
    def __init__(self, gpt, *, use_graphs: Optional[bool] = None, steps_per_graph: int = STEPS_PER_GRAPH,
                 bucket: int = BUCKET, backend: Optional[str] = None, passes_per_graph: int = 1):
        """`passes_per_graph`: Jacobi window passes per graph replay (the host reads the frontier once per
        replay; passes after a segment is complete are no-ops, counted in the stats)."""
        for name, value in (("steps_per_graph", steps_per_graph), ("bucket", bucket),
                            ("passes_per_graph", passes_per_graph)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name} must be an integer >= 1, got {value!r}")
        if backend not in (None, "torch", "triton"):
            raise InvalidArgument(f"backend must be None (dispatch decides), 'torch' or 'triton', got {backend!r}")
        self.gpt = gpt
        self.bucket = bucket
        self.use_graphs_setting = use_graphs
        self.steps_per_graph = int(steps_per_graph)
        self.passes_per_graph = int(passes_per_graph)
        self.backend_setting = backend
        self.cache: Optional[KVCache] = None
        self.weak_cache: Optional[KVCache] = None
        self.weak_owner = None  # the weak model weak_cache was made for
        self.buffers: Optional[DecodeBuffers] = None
        self.graphs: Optional[StepGraphs] = None
        self.binding = None  # addresses the captured graphs depend on
        self.allocations = 0  # cache (re)allocations so far: part of the binding
        self.jacobi_buffers = None  # (binding, jacobi.WindowState) of Jacobi decoding, made by its first request
        # The split-K scratch of the fused decode-layer kernels; the graphs were captured with it at
        # workspace_binding.
        self.workspace = None
        self.workspace_binding = None
        self.request: Optional[Request] = None  # the last request begun

    # ------------------------------------------------------------------ settings
    @property
    def device(self) -> torch.device:
        return self.gpt.output.weight.device

    @property
    def use_graphs(self) -> bool:
        on_cuda = self.device.type == "cuda"
        return on_cuda if self.use_graphs_setting is None else (bool(self.use_graphs_setting) and on_cuda)

    @property
    def backend(self) -> str:
        """'triton' or 'torch' for the block ops and the sampler (kernels.dispatch decides, once per request)."""
        if self.backend_setting is not None:
            return self.backend_setting
        from ..kernels.dispatch import select_backend

        return select_backend(self.device)

    # ------------------------------------------------------------------ memory and buffers
    def check_memory(self, batch: int, rows: int, num_tokens: int, positions_per_pass: int = 1) -> None:
        """Refuse a request whose KV cache + workspaces (for `positions_per_pass` positions per forward) do not fit;
        a cache that must grow is released first (the engine would otherwise hold the old and the new at once)."""
        weight = self.gpt.output.weight
        max_len = self.gpt.config.cls_token_num + num_tokens
        resident = self.cache is not None and self.cache.fits(rows, max_len, weight.dtype, weight.device)
        if not resident:
            self.cache = None
        check_generation_fits(self.gpt, batch=batch, rows=rows, num_tokens=num_tokens,
                              positions_per_pass=positions_per_pass, cache_resident=resident)

    def _fit(self, batch: int, rows: int, max_len: int, weak) -> None:
        """Caches and buffers that fit this request; graphs are dropped whenever an address they use changes."""
        gpt = self.gpt
        dtype, device = gpt.output.weight.dtype, self.device
        if self.cache is None or not self.cache.fits(rows, max_len, dtype, device):
            self.cache = None  # free the old cache before allocating the new one
            self.cache = gpt.new_cache(rows, max_len)
            self.allocations += 1  # not id(): a new object may reuse a freed one's id
        if weak is not None:
            wdtype = next(weak.parameters()).dtype
            if self.weak_owner is not weak or not self.weak_cache.fits(batch, self.weak_cache.max_len, wdtype, device):
                self.weak_cache = None
                self.weak_cache, self.weak_owner = weak.new_cache(batch), weak
                self.allocations += 1
        # A request without a weak model keeps the weak cache (and the graphs) of the last one that had it.
        binding = (self.allocations, addresses(gpt), addresses(self.weak_owner))
        if binding == self.binding:
            return
        self.buffers = DecodeBuffers.allocate(self.cache.rows, self.cache.max_len, gpt.config.vocab_size, device)
        if self.graphs is not None:
            self.graphs.clear()
        self.graphs = StepGraphs(device) if self.use_graphs else None
        self.binding = binding

    # ------------------------------------------------------------------ a request
    def on_device(self):
        """The context a request runs in: graph capture and Triton launches use the *current* CUDA device, so it
        is made the model's."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def begin_request(self, cond, cond_mask, modes, keys, knobs, weak, compact_rows) -> Request:
        """cond [B] / [B, T, C] and keys [B] (validated), modes [N], the sampler's knobs (numbers or [B] tensors)
        -> the Request: caches and buffers fitted, keys and knobs loaded, counters and NaN flag reset, the backend,
        the sampler's flags (and, before any capture, its select path), the prefix mask and null prefix."""
        B, N = cond.shape[0], len(modes)
        gpt, V = self.gpt, self.gpt.config.vocab_size
        uses_uncond, uses_weak = needs_uncond(modes), needs_weak(modes)
        weak = weak if uses_weak else None
        self._fit(B, 2 * B if uses_uncond else B, gpt.config.cls_token_num + N, weak)
        buffers = self.buffers
        buffers.keys[:B].copy_(keys)
        for name, value in knobs.items():
            buffers.knobs[name][:B].copy_(torch.as_tensor(value, dtype=KNOB_DTYPES[name]).expand(B))
        buffers.counters.all.zero_()
        buffers.finite.fill_(True)
        backend = self.backend
        cond, mask, null_prefix = set_up_prefix(gpt, self.cache, cond, cond_mask, uses_uncond)
        # Host facts about the knobs, read once (not per step): which filters any row uses (a filter no row uses is
        # compiled out of the sampler and, with none, no logits row is written to scratch) and the largest top_k.
        request = Request(
            B, N, uses_uncond and not compact_rows, weak, cond, mask, null_prefix, backend,
            # graphs need the fused backend: the torch reference sampler syncs with the host (so without Triton on
            # CUDA the same steps run eagerly; the dispatch logs why)
            graphs=self.graphs is not None and backend == "triton", keys=buffers.keys[:B],
            knobs={name: t[:B] for name, t in buffers.knobs.items()}, finite=buffers.finite,
            filters=filter_flags(knobs["temperature"], knobs["top_k"], knobs["top_p"], V),
            top_k_max=min(int(torch.as_tensor(knobs["top_k"]).max()), V))
        if request.graphs:
            request.select = self._choose_select(request)
        self.request = request
        return request

    def _choose_select(self, request: Request) -> str:
        """Before any capture of the request: the sampler's select path for (device, batch, V, filters), timed
        against the torch path once per key on CUDA (kernels.dispatch.choose_sampler_select)."""
        from ..kernels.dispatch import choose_sampler_select
        from ..kernels.fused_guided_sample import select_candidates

        V, B, knobs = self.gpt.config.vocab_size, request.batch, request.knobs
        return choose_sampler_select(
            self.device, B, V, request.filters,
            lambda: select_candidates(B, V, self.device, temperature=knobs["temperature"], top_k=knobs["top_k"],
                                      top_p=knobs["top_p"], seeds=request.keys, filters=request.filters,
                                      top_k_max=request.top_k_max))

    def prepare_decode_ops(self, request: Request, passes) -> None:
        """Before any capture of the request: the fused decode-layer kernels of every forward it runs at a device
        position, `passes` = [(model, rows, width)] (the base model and the weak model, one entry per row count
        and window width), one decode_ops.choose per trunk shape (timed once per shape on CUDA, cached by the
        guard) into `request.decode_ops`, and the split-K workspace grown to what all of them need. Graphs
        captured with a workspace that has moved since are dropped (they read the old one)."""
        request.decode_ops = {}
        if request.backend != "triton":
            return
        from ..kernels.skinny_gemm import SplitKWorkspace
        from .decode_ops import choose, reserve

        if self.workspace is None:
            self.workspace = SplitKWorkspace()
        for model, rows, width in passes:
            if model is None or not hasattr(model, "layers"):  # a stand-in weak model without LlamaGen blocks
                continue
            shape = LayerShape.of(model.layers, rows, width)
            if shape not in request.decode_ops:
                reserve(self.workspace, shape, self.device)
                request.decode_ops[shape] = choose(model.layers, model.rope, shape, self.device, self.workspace)
        binding = tuple(None if t is None else t.data_ptr() for t in (self.workspace.partials,
                                                                      self.workspace.counters))
        if binding != self.workspace_binding:
            if self.graphs is not None:
                self.graphs.clear()
            self.workspace_binding = binding

    # ------------------------------------------------------------------ one step (device-only)
    def _sample(self, request: Request, mode: str, hidden: torch.Tensor, weak_hidden: Optional[torch.Tensor],
                record: bool) -> None:
        """hidden [R, d] (cond rows first), weak_hidden [B, d] | None -> token written at the token index."""
        B, buffers = request.batch, self.buffers
        cond, uncond, weak, sample_mode, logits = mode_logits(self.gpt, mode, B, hidden, weak_hidden)
        result = guided_sample(cond, uncond, weak, mode=sample_mode, **request.knobs, seeds=request.keys,
                               offset=buffers.counters.philox_offset, return_mixed=record, check_values=False,
                               backend=request.backend, filters=request.filters, select=request.select,
                               top_k_max=request.top_k_max)
        tokens, mixed = result if record else (result, None)
        buffers.tokens_out[:B].index_copy_(1, buffers.counters.token_index, tokens[:, None])
        halves = 2 if buffers.tokens_in.shape[0] >= 2 * B else 1  # the same token feeds both halves
        buffers.tokens_in[:halves * B].view(halves, B).copy_(tokens.expand(halves, B))
        if record:
            hidden_out, weak_logits_out, mixed_out = buffers.record
            hidden_out[:hidden.shape[0]].copy_(hidden)
            mixed_out[:B].copy_(mixed)
            if MODE_TABLE[mode].weak:
                weak_logits_out[:B].copy_(logits[-B:])

    def _step(self, request: Request, mode: str, rows: int, max_end: int, weak_max_end: int, record: bool) -> None:
        gpt, buffers, weak, B = self.gpt, self.buffers, request.weak, request.batch
        x = gpt.embed_tokens(buffers.tokens_in[:rows])[:, None]  # [R, 1, d]
        hidden = gpt.forward_hidden(x, self.cache, position=buffers.counters.position, max_end=max_end,
                                    backend=request.backend, decode_ops=request.ops_for(gpt, rows, 1))[:, 0]  # [R, d]
        finite = torch.isfinite(hidden).all()
        weak_hidden = None
        if weak is not None:  # stepped at every token so its cache never has holes
            weak_hidden = weak.step_hidden(hidden[:B], self.weak_cache, position=buffers.counters.weak_position,
                                           max_end=weak_max_end, backend=request.backend,
                                           **weak_ops_kwargs(request.ops_for(weak, B, 1)))
            finite = finite & torch.isfinite(weak_hidden).all()
        buffers.finite.logical_and_(finite)
        self._sample(request, mode, hidden, weak_hidden, record)
        buffers.counters.advance()

    def prefill(self, request: Request, guesses: torch.Tensor, two_halves: bool) -> tuple:
        """A request's first forward (eager, host positions; shared by sequential and Jacobi decoding): the prefix and
        `guesses` [B, w - 1] through the base model (step.prefill_inputs), the weak model prefilled and run over
        the same w positions, NaN/inf into the request's flag -> (hidden [R, w, d], weak hidden [B, w, d] | None)."""
        gpt, B, T, weak, backend = self.gpt, request.batch, self.gpt.config.cls_token_num, request.weak, request.backend
        x = prefill_inputs(gpt, gpt.condition_embeddings(request.cond), request.null_prefix, guesses, two_halves)
        hidden = gpt.forward_hidden(x, self.cache, backend=backend)[:, T - 1:]
        request.finite.logical_and_(torch.isfinite(hidden).all())
        weak_hidden = None
        if weak is not None:
            weak.prefill(request.cond, self.weak_cache, request.mask, backend=backend)
            weak_hidden = weak.window_hidden(hidden[:B], self.weak_cache, start=T, backend=backend)
            request.finite.logical_and_(torch.isfinite(weak_hidden).all())
        return hidden, weak_hidden

    # ------------------------------------------------------------------ sequential decoding
    @torch.inference_mode()
    def decode(self, request: Request, modes: list[str], *, on_step: Optional[Callable] = None,
               progress_bar=None) -> tuple[torch.Tensor, GenerationStats]:
        """Sequential decoding of a request (after `begin_request`, inside `on_device()`): one token per step ->
        (tokens [B, N] view, stats). Jacobi decoding runs on the same state: `jacobi.run_static`."""
        gpt, buffers = self.gpt, self.buffers
        B, N, weak = request.batch, request.num_tokens, request.weak
        T = gpt.config.cls_token_num
        stats = GenerationStats()
        record = on_step is not None
        if record:
            buffers.recorded(gpt.config.dim, gpt.output.weight.dtype, gpt.config.vocab_size)
        self.prepare_decode_ops(request, {(gpt, request.rows(mode), 1) for mode in modes[1:]} | {(weak, B, 1)})

        # ---- token 0: eager prefill of the prefix (both halves if token 0 needs them), then one sample
        run_u = request.rows(modes[0]) == 2 * B
        hidden, weak_hidden = self.prefill(request, buffers.tokens_out[:B, :0], run_u)
        uncond_filled = T if run_u else 0
        self._sample(request, modes[0], hidden[:, 0], None if weak_hidden is None else weak_hidden[:, 0], record)
        # The first decode step feeds token 0 at position T (the weak model's h_c[1] goes to T + 1); token index 1.
        buffers.counters.start(position=T, weak_position=T + 1, token_index=1, philox_offset=gpt.config.vocab_size)
        stats.step_rows.append(2 * B if run_u else B)
        if record:
            self._emit(on_step, request, 0, modes[0])
        if progress_bar is not None:
            progress_bar.update(1)

        # ---- tokens 1..N-1: chunks of steps with one (mode, rows)
        i = 1
        while i < N:
            mode = modes[i]
            rows = request.rows(mode)
            run_u = rows == 2 * B
            position = T + i - 1  # fed at token i's step
            if run_u and uncond_filled < position:
                self.catch_up(request, uncond_filled, position, stats)
            run_end = i
            while run_end < N and modes[run_end] == mode:
                run_end += 1
            limit = 1 if record else self.steps_per_graph
            if request.backend == "torch":  # the reference attention reads to the bucket end: stay in one bucket
                run_end = min(run_end, i + (self.bucket - position % self.bucket))
            for k in chunk_sizes(run_end - i, limit):
                self._run_chunk(request, mode, rows, k, T + i - 1, record)
                if record:
                    self._emit(on_step, request, i, mode)
                stats.step_rows.extend([rows] * k)
                i += k
                if progress_bar is not None:
                    progress_bar.update(k)
            if run_u:
                uncond_filled = T + i - 1
        stats.weak_steps = N if weak is not None else 0
        return buffers.tokens_out[:B, :N], stats.sequential(B, N)

    def _max_ends(self, request: Request, first_position: int) -> tuple[int, int]:
        """Host bounds of the keys a chunk starting at `first_position` may read (base, weak)."""
        S = self.cache.max_len
        weak_len = self.weak_cache.max_len if request.weak is not None else 0
        if request.backend != "torch":
            return S, weak_len
        end = min(math.ceil((first_position + 1) / self.bucket) * self.bucket, S)
        weak_end = min(end + 1, weak_len)  # the weak model's position runs one ahead of the base's
        return end, weak_end

    def _run_chunk(self, request: Request, mode: str, rows: int, steps: int, first_position: int,
                   record: bool) -> None:
        max_end, weak_end = self._max_ends(request, first_position)

        def chunk():
            for _ in range(steps):
                self._step(request, mode, rows, max_end, weak_end, record)

        if not request.graphs:
            chunk()
            return
        key = (mode, request.batch, rows, steps, max_end, weak_end, self.cache.masked, record,
               request.ops_key(self.gpt, rows, 1), request.filters, request.select)
        self.graphs.run(key, chunk, self.buffers.state, self.buffers.restore)

    def catch_up(self, request: Request, filled: int, position: int, stats: GenerationStats) -> None:
        """Prefill the uncond rows over positions filled..position-1 from the tokens written so far."""
        request.finite.logical_and_(catch_up_uncond(self.gpt, self.cache, request.null_prefix,
                                                    self.buffers.tokens_out[:request.batch], filled, position, stats,
                                                    request.backend))

    def _emit(self, on_step, request: Request, index: int, mode: str) -> None:
        spec, B = MODE_TABLE[mode], request.batch
        hidden_out, weak_logits_out, mixed_out = self.buffers.record
        on_step(StepRecord(index, mode, self.buffers.tokens_out[:B, index].clone(), hidden_out[:B].clone(),
                           hidden_out[B:2 * B].clone() if spec.uncond else None,
                           weak_logits_out[:B].clone() if spec.weak else None, mixed_out[:B].clone()))
