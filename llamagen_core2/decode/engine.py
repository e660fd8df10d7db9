"""The decode engine: caller-owned decoding state and one fixed-shape decode step that serves every mode.

Contract (why: docs/design.md#decode-engine):
  * `Engine(gpt)` owns everything decoding keeps between tokens: the base KV cache (rows [cond 0:B; uncond B:2B],
    LlamaGen's CFG layout), the weak model's KV cache, device buffers (tokens, positions, the sampler's per-row
    knobs and Philox keys, the NaN flag) and the captured CUDA graphs. Nothing lives on the model. Keep one
    Engine per (model, device) and pass it to every `generate(..., engine=engine)` call (LlamaGenPipeline does):
    buffers and graphs are reused while they fit; a larger request reallocates them.
  * A request: inside `engine.on_device()`, `begin_request(...)` fits the caches and buffers to it and loads its
    keys and knobs, then `decode(request, modes)` decodes it sequentially (Jacobi decoding runs on the same state:
    jacobi.run_static): eager prefill of the condition prefix (and the weak model's), token 0 sampled from it,
    then the per-token plan in chunks of consecutive steps with the same mode and row count.
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
    timed-choice guard: the fused kernel only where it measured faster than today's ops. The decisions and the
    split-K workspace they share live here (`decode_ops`, `workspace`); the flags join the graph key.
  * Randomness: the sampler's Philox keys (one per image, `guidance/seeding.py`) and the draw counter (token index x V)
    live in device buffers, so eager, static and graph-replayed decoding draw the same numbers.
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
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import InvalidArgument
from ..guidance.config import MODE_TABLE, needs_uncond, needs_weak
from ..guidance.sampling import filter_flags, guided_sample
from .decode_ops import DecodeOps, LayerShape
from .kv_cache import KVCache
from .static_decode import StepGraphs
from .step import GenerationStats, StepRecord, catch_up_uncond, mode_logits, weak_ops_kwargs

BUCKET = 64  # positions per attention-length bucket of the torch reference path
STEPS_PER_GRAPH = 32  # decode steps captured in one CUDA graph (a chunk); shorter runs use powers of two


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
class Request:
    """One request's shape facts, set up by `Engine.begin_request` (shared by sequential and Jacobi decoding)."""
    batch: int
    num_tokens: int
    uses_uncond: bool
    all_rows_always: bool  # compact_rows=False: the uncond half is computed at every step once any token needs it
    weak: Optional[torch.nn.Module]  # the weak model when any token uses it, else None
    cond: torch.Tensor  # on the device
    mask: Optional[torch.Tensor]  # bool [B, T] on the device, or None

    def rows(self, mode: str) -> int:
        """Base rows a step of `mode` computes: [cond; uncond] when it (or compact_rows=False) needs them."""
        return 2 * self.batch if MODE_TABLE[mode].uncond or self.all_rows_always else self.batch


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
        self.graphs: Optional[StepGraphs] = None
        self.binding = None  # addresses the captured graphs depend on
        self.allocations = 0  # cache (re)allocations so far: part of the binding
        self.jacobi_buffers = None  # (binding, jacobi.WindowState) of Jacobi decoding, made by its first request
        # The fused decode-layer kernels of the current request per trunk shape (decode_ops.py; decided before
        # any capture) and their split-K scratch; the graphs were captured with the workspace at workspace_binding.
        self.decode_ops: dict = {}
        self.workspace = None
        self.workspace_binding = None

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
        """'triton' or 'torch' for the block ops and the sampler (kernels.dispatch decides, once per call)."""
        if self.backend_setting is not None:
            return self.backend_setting
        from ..kernels.dispatch import select_backend

        return select_backend(self.device)

    # ------------------------------------------------------------------ buffers
    def _ensure(self, batch: int, rows: int, max_len: int, weak) -> None:
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
        cap_rows, cap_len, V = self.cache.rows, self.cache.max_len, gpt.config.vocab_size
        self.tokens_in = torch.zeros(cap_rows, dtype=torch.long, device=device)  # token fed at this step, per row
        self.tokens_out = torch.zeros(cap_rows, cap_len, dtype=torch.long, device=device)  # [B, N] image tokens
        # counters: [base position, weak position, token index, Philox counter base], advanced by one add per step
        self.counters = torch.zeros(4, dtype=torch.long, device=device)
        self.increments = torch.tensor([1, 1, 1, V], dtype=torch.long, device=device)
        self.keys = torch.zeros(cap_rows, dtype=torch.long, device=device)
        self.knobs = {name: torch.zeros(cap_rows, dtype=torch.float32, device=device)
                      for name in ("cfg_scale", "w2s_scale", "temperature", "top_p")}
        self.knobs["top_k"] = torch.zeros(cap_rows, dtype=torch.long, device=device)
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.record_buffers = None  # allocated by the first request with on_step (Collect), see _record_buffers
        if self.graphs is not None:
            self.graphs.clear()
        self.graphs = StepGraphs(device) if self.use_graphs else None
        self.binding = binding

    def _load_request(self, batch: int, keys: torch.Tensor, knobs: dict) -> None:
        self.keys[:batch].copy_(keys)
        for name, value in knobs.items():
            self.knobs[name][:batch].copy_(torch.as_tensor(value, dtype=self.knobs[name].dtype).expand(batch))
        self.counters.zero_()
        self.finite.fill_(True)
        # Host facts about the request's knobs, read once (not per step): which filters any row uses (a filter no
        # row uses is compiled out of the sampler and, with none, no logits row is written to scratch) and the
        # largest top_k (the torch select path's torch.topk width). Both join the graph key.
        V = self.gpt.config.vocab_size
        self.filters = filter_flags(knobs["temperature"], knobs["top_k"], knobs["top_p"], V)
        self.top_k_max = min(int(torch.as_tensor(knobs["top_k"]).max()), V)
        self.select_now = "kernel"

    def _choose_select(self, batch: int) -> None:
        """Before any capture of this request: the sampler's select path for (device, batch, V, filters), timed
        against the torch path once per key on CUDA (kernels.dispatch.choose_sampler_select)."""
        from ..kernels.dispatch import choose_sampler_select
        from ..kernels.fused_guided_sample import select_candidates

        V, B = self.gpt.config.vocab_size, batch
        self.select_now = choose_sampler_select(
            self.device, B, V, self.filters,
            lambda: select_candidates(B, V, self.device, temperature=self.knobs["temperature"][:B],
                                      top_k=self.knobs["top_k"][:B], top_p=self.knobs["top_p"][:B],
                                      seeds=self.keys[:B], filters=self.filters, top_k_max=self.top_k_max))

    def prepare_decode_ops(self, passes) -> None:
        """Before any capture of this request: the fused decode-layer kernels of every forward it runs at a device
        position, `passes` = [(model, rows, width)] (the base model and the weak model, one entry per row count
        and window width), one decode_ops.choose per trunk shape (timed once per shape on CUDA, cached by the
        guard), and the split-K workspace grown to what all of them need. Graphs captured with a workspace that
        has moved since are dropped (they read the old one)."""
        self.decode_ops = {}
        if self.backend_now != "triton":
            return
        from ..kernels.skinny_gemm import SplitKWorkspace
        from .decode_ops import choose, reserve

        if self.workspace is None:
            self.workspace = SplitKWorkspace()
        for model, rows, width in passes:
            if model is None or not hasattr(model, "layers"):  # a stand-in weak model without LlamaGen blocks
                continue
            shape = LayerShape.of(model.layers, rows, width)
            if shape not in self.decode_ops:
                reserve(self.workspace, shape, self.device)
                self.decode_ops[shape] = choose(model.layers, model.rope, shape, self.device, self.workspace)
        buffers = self.workspace.partials, self.workspace.counters
        binding = tuple(None if t is None else t.data_ptr() for t in buffers)
        if binding != self.workspace_binding:
            if self.graphs is not None:
                self.graphs.clear()
            self.workspace_binding = binding

    def ops_for(self, model, rows: int, width: int) -> Optional[DecodeOps]:
        """The fused decode ops chosen for `model`'s trunk at rows x width, or None (the unfused ops)."""
        if not self.decode_ops or model is None or not hasattr(model, "layers"):
            return None
        ops = self.decode_ops.get(LayerShape.of(model.layers, rows, width))
        return ops if ops is not None and any(ops.key) else None

    def ops_key(self, rows: int, width: int, weak) -> tuple:
        """The fused-kernel flags of a pass (base, weak): part of its graph key."""
        return tuple(None if ops is None else ops.key
                     for ops in (self.ops_for(self.gpt, rows, width), self.ops_for(weak, self.batch_now, width)))

    def request_knobs(self, batch: int) -> dict:
        """The sampler's per-row knobs of the current request (device tensors [B])."""
        return {name: t[:batch] for name, t in self.knobs.items()}

    # ------------------------------------------------------------------ one step (device-only)
    def _sample(self, mode: str, batch: int, hidden: torch.Tensor, weak_hidden: Optional[torch.Tensor],
                record: bool) -> None:
        """hidden [R, d] (cond rows first), weak_hidden [B, d] | None -> token written at the token index."""
        spec = MODE_TABLE[mode]
        B = batch
        cond, uncond, weak, mode, logits = mode_logits(self.gpt, mode, B, hidden, weak_hidden)
        knobs = self.request_knobs(B)
        result = guided_sample(cond, uncond, weak, mode=mode, **knobs, seeds=self.keys[:B],
                               offset=self.counters[3:4], return_mixed=record, check_values=False,
                               backend=self.backend_now, filters=self.filters, select=self.select_now,
                               top_k_max=self.top_k_max)
        tokens, mixed = result if record else (result, None)
        self.tokens_out[:B].index_copy_(1, self.counters[2:3], tokens[:, None])
        halves = 2 if self.tokens_in.shape[0] >= 2 * B else 1  # the same token feeds both halves
        self.tokens_in[:halves * B].view(halves, B).copy_(tokens.expand(halves, B))
        if record:
            hidden_out, weak_logits_out, mixed_out = self.record_buffers
            hidden_out[:hidden.shape[0]].copy_(hidden)
            mixed_out[:B].copy_(mixed)
            if spec.weak:
                weak_logits_out[:B].copy_(logits[-B:])

    def _step(self, mode: str, batch: int, rows: int, max_end: int, weak, weak_max_end: int, record: bool) -> None:
        gpt = self.gpt
        backend = self.backend_now
        x = gpt.embed_tokens(self.tokens_in[:rows])[:, None]  # [R, 1, d]
        hidden = gpt.forward_hidden(x, self.cache, position=self.counters[0:1], max_end=max_end, backend=backend,
                                    decode_ops=self.ops_for(gpt, rows, 1))[:, 0]  # [R, d]
        finite = torch.isfinite(hidden).all()
        weak_hidden = None
        if weak is not None:  # stepped at every token so its cache never has holes
            weak_hidden = weak.step_hidden(hidden[:batch], self.weak_cache, position=self.counters[1:2],
                                           max_end=weak_max_end, backend=backend,
                                           **weak_ops_kwargs(self.ops_for(weak, batch, 1)))
            finite = finite & torch.isfinite(weak_hidden).all()
        self.finite.logical_and_(finite)
        self._sample(mode, batch, hidden, weak_hidden, record)
        self.counters.add_(self.increments)

    # ------------------------------------------------------------------ a request
    def on_device(self):
        """The context a request runs in: graph capture and Triton launches use the *current* CUDA device, so it
        is made the model's."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def begin_request(self, cond, cond_mask, modes, keys, knobs, weak, compact_rows) -> Request:
        """Caches and buffers that fit the request, the backend, the request's keys and knobs, the prefix mask."""
        B, N = cond.shape[0], len(modes)
        T = self.gpt.config.cls_token_num
        uses_uncond, uses_weak = needs_uncond(modes), needs_weak(modes)
        weak = weak if uses_weak else None
        self._ensure(B, 2 * B if uses_uncond else B, T + N, weak)
        self.backend_now = self.backend
        self.batch_now = B
        self.decode_ops = {}
        # Graphs need the fused backend: the torch reference sampler syncs with the host (so without Triton on
        # CUDA the same steps run eagerly; the dispatch logs why).
        self.graphs_now = self.graphs is not None and self.backend_now == "triton"
        self._load_request(B, keys, knobs)
        if self.graphs_now:
            self._choose_select(B)
        device = self.device
        mask = None if cond_mask is None else cond_mask.to(device=device, dtype=torch.bool)
        self.cache.set_prefix_mask(mask, copies=2 if uses_uncond else 1)
        cond = cond.to(device)
        self.null_prefix = self.gpt.condition_embeddings(self.gpt.null_condition(B, cond)) if uses_uncond else None
        # LlamaGen (compact_rows=False): compute the uncond half at every step once any token needs it
        return Request(B, N, uses_uncond, uses_uncond and not compact_rows, weak, cond, mask)

    @torch.inference_mode()
    def decode(self, request: Request, modes: list[str], *, on_step: Optional[Callable] = None,
               progress_bar=None) -> tuple[torch.Tensor, GenerationStats]:
        """Sequential decoding of a request (after `begin_request`, inside `on_device()`): one token per step ->
        (tokens [B, N] view, stats). Jacobi decoding runs on the same state: `jacobi.run_static`."""
        gpt = self.gpt
        B, N, weak, cond, mask = request.batch, request.num_tokens, request.weak, request.cond, request.mask
        T = gpt.config.cls_token_num
        all_rows_always = request.all_rows_always
        stats = GenerationStats()
        record = on_step is not None
        if record:
            self._record_buffers()
        self.prepare_decode_ops({(gpt, request.rows(mode), 1) for mode in modes[1:]} | {(weak, B, 1)})

        # ---- token 0: eager prefill of the prefix (both halves if token 0 needs them), then one sample
        run_u = MODE_TABLE[modes[0]].uncond or all_rows_always
        prefix = gpt.condition_embeddings(cond)
        if run_u:
            prefix = torch.cat([prefix, self.null_prefix])
        hidden = gpt.forward_hidden(prefix, self.cache, backend=self.backend_now)[:, -1]
        self.finite.logical_and_(torch.isfinite(hidden).all())
        uncond_filled = T if run_u else 0
        weak_hidden = None
        if weak is not None:
            weak.prefill(cond, self.weak_cache, mask, backend=self.backend_now)
            weak_hidden = weak.step_hidden(hidden[:B], self.weak_cache, start=T, backend=self.backend_now)
            self.finite.logical_and_(torch.isfinite(weak_hidden).all())
        self._sample(modes[0], B, hidden, weak_hidden, record)
        # The first decode step feeds token 0 at position T (the weak model's h_c[1] goes to T + 1); token index 1.
        self.counters.copy_(torch.tensor([T, T + 1, 1, gpt.config.vocab_size]))
        stats.step_rows.append(2 * B if run_u else B)
        if record:
            self._emit(on_step, 0, modes[0], B)
        if progress_bar is not None:
            progress_bar.update(1)

        # ---- tokens 1..N-1: chunks of steps with one (mode, rows)
        i = 1
        while i < N:
            mode = modes[i]
            run_u = MODE_TABLE[mode].uncond or all_rows_always
            rows = 2 * B if run_u else B
            position = T + i - 1  # fed at token i's step
            if run_u and uncond_filled < position:
                self.catch_up(B, uncond_filled, position)
                stats.catchup_rows += B * (position - uncond_filled)
                stats.catchup_calls += 1
            run_end = i
            while run_end < N and modes[run_end] == mode:
                run_end += 1
            limit = 1 if record else self.steps_per_graph
            if self.backend_now == "torch":  # the reference attention reads to the bucket end: stay in one bucket
                run_end = min(run_end, i + (self.bucket - position % self.bucket))
            for k in chunk_sizes(run_end - i, limit):
                self._run_chunk(mode, B, rows, k, T + i - 1, weak, record)
                if record:
                    self._emit(on_step, i, mode, B)
                stats.step_rows.extend([rows] * k)
                i += k
                if progress_bar is not None:
                    progress_bar.update(k)
            if run_u:
                uncond_filled = T + i - 1
        stats.weak_steps = N if weak is not None else 0
        return self.tokens_out[:B, :N], stats.sequential(B, N)

    def _max_ends(self, first_position: int, weak) -> tuple[int, int]:
        """Host bounds of the keys a chunk starting at `first_position` may read (base, weak)."""
        S = self.cache.max_len
        weak_len = self.weak_cache.max_len if weak is not None else 0
        if self.backend_now != "torch":
            return S, weak_len
        end = min(math.ceil((first_position + 1) / self.bucket) * self.bucket, S)
        weak_end = min(end + 1, weak_len)  # the weak model's position runs one ahead of the base's
        return end, weak_end

    def _run_chunk(self, mode: str, batch: int, rows: int, steps: int, first_position: int, weak,
                   record: bool) -> None:
        max_end, weak_end = self._max_ends(first_position, weak)

        def chunk():
            for _ in range(steps):
                self._step(mode, batch, rows, max_end, weak, weak_end, record)

        if not self.graphs_now:
            chunk()
            return
        key = (mode, batch, rows, steps, max_end, weak_end, self.cache.masked, record, self.ops_key(rows, 1, weak),
               self.filters, self.select_now)
        self.graphs.run(key, chunk, self._save_state, self._restore_state)

    def _save_state(self):
        return self.counters.clone(), self.tokens_in.clone(), self.finite.clone()

    def _restore_state(self, saved) -> None:
        counters, tokens_in, finite = saved
        self.counters.copy_(counters)
        self.tokens_in.copy_(tokens_in)
        self.finite.copy_(finite)

    def catch_up(self, batch: int, filled: int, position: int) -> None:
        """Prefill the uncond rows over positions filled..position-1 from the tokens written so far."""
        hidden = catch_up_uncond(self.gpt, self.cache, self.null_prefix, self.tokens_out[:batch], filled, position,
                                 self.backend_now)
        self.finite.logical_and_(torch.isfinite(hidden).all())

    def _record_buffers(self) -> None:
        """What a step saw, kept for on_step in fixed buffers: hidden [rows, d], weak logits and mixed [rows, V]."""
        if self.record_buffers is None:
            rows, V, w = self.cache.rows, self.gpt.config.vocab_size, self.gpt.output.weight
            self.record_buffers = (torch.zeros(rows, self.gpt.config.dim, dtype=w.dtype, device=w.device),
                                   torch.zeros(rows, V, dtype=torch.float32, device=w.device),
                                   torch.zeros(rows, V, dtype=torch.float32, device=w.device))

    def _emit(self, on_step, index: int, mode: str, batch: int) -> None:
        spec = MODE_TABLE[mode]
        B = batch
        hidden_out, weak_logits_out, mixed_out = self.record_buffers
        on_step(StepRecord(index, mode, self.tokens_out[:B, index].clone(), hidden_out[:B].clone(),
                           hidden_out[B:2 * B].clone() if spec.uncond else None,
                           weak_logits_out[:B].clone() if spec.weak else None, mixed_out[:B].clone()))
