"""Static-shape decode step: fixed buffers, positions in device tensors, one CUDA graph per shape on GPU.

Contract (DESIGN §6):
  * `StaticDecoder.for_model(gpt)` returns the decoder cached on the model (graphs are reused across
    generate() calls); it works on the model's own static KV cache (`gpt.caches`, rows [cond 0:B; uncond B:2B]),
    so prefill and catch-up prefill stay plain eager `gpt.forward_hidden` calls outside any graph.
  * `prepare(batch, prefix_valid)` once per generate() call (t2i prefix mask [B, T] or None).
  * `step(prev_tokens [B], position, rows)` feeds token `prev_tokens` at sequence `position` to cache rows
    0:rows (rows = B or 2B: row compaction is a different graph, not masked work) and returns views
    (hidden [rows, d], fp32 logits [rows, V]) that stay valid until the next step.
  * Inside a step nothing depends on host values: the position lives in a device tensor, K/V are written with
    `index_copy_`, RoPE rows are gathered with `index_select`, and attention reads the cache up to the end of
    the position's length bucket (multiples of `bucket`, default 64) with a `key <= position` mask inside the
    bucket. Shapes depend only on (rows, bucket end, prefix mask on/off) -- the graph key.
  * On CUDA (use_graphs default) each key is captured once as a CUDA graph (shared memory pool) and replayed;
    on CPU the very same step runs eagerly, which is how the CPU tests check it against the plain path.
  * Optional in-graph sampling (`sample=`, cond/cfg modes only): `guided_sample` is captured too, drawing
    from a decoder-owned CUDA generator registered with `CUDAGraph.register_generator_state` (torch >= 2.4;
    checked in the torch 2.13 stubs) whose state is loaded from / written back to the caller's generator.
    Only used when the sampler is host-sync free (the fused Triton backend); the torch reference sampler
    syncs (`bool(tensor)` checks), so with it sampling runs eagerly after the graph.

Why buckets (not a full-length masked read, not a Triton decode-attention kernel): a graph needs static
shapes, and reading the whole preallocated cache costs up to 4x the filled part at 1024 tokens; a bucket of
64 positions reads at most 63 extra keys (~25% of the average filled KV at 256 tokens, ~6% at 1024) for
ceil((T+N)/64) graphs per row count. Unmeasured on GPU in this session (no GPU); see benchmarks/RESULTS.md.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .model import apply_rotary

log = logging.getLogger(__name__)
DEFAULT_BUCKET = 64  # positions per attention length bucket (one graph per bucket and row count)


class StaticDecoder:
    def __init__(self, gpt, bucket: int = DEFAULT_BUCKET, use_graphs: Optional[bool] = None):
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        self.gpt, self.bucket = gpt, int(bucket)
        self.use_graphs_setting = use_graphs
        self.graphs: dict = {}
        self.pool = None
        self.cache_key = None
        self.masked = False
        self.batch = 0
        self.graph_sampling_failed = False
        self.generator: Optional[torch.Generator] = None

    @classmethod
    def for_model(cls, gpt, bucket: Optional[int] = None, use_graphs: Optional[bool] = None) -> "StaticDecoder":
        """The decoder cached on `gpt`; created (bucket default 64) or replaced when explicit settings differ.
        generate() calls it without settings, so a decoder configured beforehand is the one it uses."""
        dec = gpt.__dict__.get("_static_decoder")
        if dec is None or (bucket is not None and dec.bucket != bucket) or \
                (use_graphs is not None and dec.use_graphs_setting != use_graphs):
            dec = cls(gpt, bucket=DEFAULT_BUCKET if bucket is None else bucket, use_graphs=use_graphs)
            gpt.__dict__["_static_decoder"] = dec  # a plain attribute: never a submodule or state_dict entry
        return dec

    # ------------------------------------------------------------------ buffers
    @property
    def device(self) -> torch.device:
        return self.gpt.output.weight.device

    @property
    def use_graphs(self) -> bool:
        on_cuda = self.device.type == "cuda"
        return on_cuda if self.use_graphs_setting is None else (bool(self.use_graphs_setting) and on_cuda)

    def _bind_cache(self) -> None:
        """(Re)allocate the static buffers when the model's KV cache was reallocated; old graphs die with it."""
        gpt = self.gpt
        # A captured graph is valid exactly while every address it recorded is unchanged: the cache buffers and
        # the weights (model.to() moves them; load_state_dict copies in place and keeps them).
        key = (gpt.cache_rows, gpt.cache_len, gpt.caches[0].k.dtype, self.device,
               tuple(t.data_ptr() for c in gpt.caches for t in (c.k, c.v)),
               tuple(p.data_ptr() for p in gpt.parameters()), gpt.rope.data_ptr())
        if key == self.cache_key:
            return
        rows, S, dev = gpt.cache_rows, gpt.cache_len, self.device
        self.graphs.clear()
        self.pool = None
        self.tokens_in = torch.zeros(rows, dtype=torch.long, device=dev)  # token fed at this step, per row
        self.position = torch.zeros(1, dtype=torch.long, device=dev)  # sequence position fed at this step
        self.key_positions = torch.arange(S, device=dev)
        self.key_valid = torch.ones(rows, S, dtype=torch.bool, device=dev)  # t2i: False at padded prefix keys
        self.hidden_out = torch.zeros(rows, gpt.config.dim, dtype=gpt.output.weight.dtype, device=dev)
        self.logits_out = torch.zeros(rows, gpt.config.vocab_size, dtype=torch.float32, device=dev)
        self.sampled_out = torch.zeros(rows, dtype=torch.long, device=dev)
        self.cache_key = key

    def prepare(self, batch: int, prefix_valid: Optional[torch.Tensor] = None) -> None:
        """Per generate() call, after setup_caches: bind buffers and load the t2i prefix mask [B, T] (or None)."""
        self._bind_cache()
        self.batch = batch
        self.masked = prefix_valid is not None
        if self.masked:
            T = prefix_valid.shape[1]
            self.key_valid.fill_(True)
            valid = prefix_valid.to(device=self.device, dtype=torch.bool)
            self.key_valid[:batch, :T] = valid
            if self.key_valid.shape[0] >= 2 * batch:
                self.key_valid[batch:2 * batch, :T] = valid  # LlamaGen masks the uncond half identically

    def bucket_end(self, position: int) -> int:
        return min(math.ceil((position + 1) / self.bucket) * self.bucket, self.gpt.cache_len)

    # ------------------------------------------------------------------ the step
    def _forward(self, rows: int, end: int, masked: bool, sample: Optional[dict]) -> None:
        """One decode step on cache rows 0:rows reading keys 0:end; writes hidden_out/logits_out(/sampled_out).
        Every shape here is a function of (rows, end, masked): safe to capture."""
        gpt = self.gpt
        c = gpt.config
        H, D, d = c.n_head, c.head_dim, c.dim
        x = gpt.embed_tokens(self.tokens_in[:rows])[:, None]  # [R, 1, d]
        rope = gpt.rope.index_select(0, self.position).float()  # [1, D/2, 2]
        mask = (self.key_positions[:end] <= self.position)[None, None, None, :]  # [1, 1, 1, end]
        if masked:
            mask = mask & self.key_valid[:rows, None, None, :end]  # [R, 1, 1, end]
        h = x
        for layer, cache in zip(gpt.layers, gpt.caches):
            attn = layer.attention
            q, k, v = attn.wqkv(layer.attention_norm(h)).split(d, dim=-1)
            q = apply_rotary(q.view(rows, 1, H, D), rope).transpose(1, 2)  # [R, H, 1, D]
            k = apply_rotary(k.view(rows, 1, H, D), rope).transpose(1, 2)
            v = v.view(rows, 1, H, D).transpose(1, 2)
            cache.k[:rows].index_copy_(2, self.position, k)
            cache.v[:rows].index_copy_(2, self.position, v)
            out = F.scaled_dot_product_attention(q, cache.k[:rows, :, :end], cache.v[:rows, :, :end], attn_mask=mask)
            h = h + attn.wo(out.transpose(1, 2).reshape(rows, 1, d))
            h = h + layer.feed_forward(layer.ffn_norm(h))
        hidden = gpt.norm(h)[:, 0]  # [R, d]
        logits = gpt.head(hidden)  # [R, V] fp32
        self.hidden_out[:rows].copy_(hidden)
        self.logits_out[:rows].copy_(logits)
        if sample is not None:
            from .guidance import guided_sample

            B = self.batch
            tokens = guided_sample(logits[:B], logits[B:2 * B] if rows > B else None, None,
                                   generator=self.generator, check_values=False, **sample)
            self.sampled_out[:B].copy_(tokens)

    def step(self, prev_tokens: torch.Tensor, position: int, rows: int, sample: Optional[dict] = None):
        """prev_tokens [B] at `position` for rows 0:rows -> (hidden [rows, d], logits [rows, V], sampled [B] | None).
        `sample` (guided_sample knobs as Python scalars) is honoured only by `graph_sampling_ok`."""
        B = self.batch
        self.tokens_in[:B].copy_(prev_tokens)
        if rows > B:
            self.tokens_in[B:rows].copy_(prev_tokens)  # the same token feeds both halves
        self.position.fill_(position)
        end = self.bucket_end(position)
        if not self.use_graphs:
            self._forward(rows, end, self.masked, None)
            return self.hidden_out[:rows], self.logits_out[:rows], None
        if sample is not None and self.graph_sampling_failed:
            sample = None
        key = (rows, end, self.masked, None if sample is None else (B, tuple(sorted(sample.items()))))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(rows, end, sample)
            if graph is None:  # in-graph sampling could not be captured; fall back to forward-only graphs
                return self.step(prev_tokens, position, rows, None)
            self.graphs[key] = graph
        graph.replay()
        return self.hidden_out[:rows], self.logits_out[:rows], None if sample is None else self.sampled_out[:B]

    # ------------------------------------------------------------------ CUDA graphs (not exercised on CPU)
    def _capture(self, rows: int, end: int, sample: Optional[dict]):
        """Warm up on a side stream (kernel selection, cuBLAS workspaces, Triton JIT), then capture.
        The warm-up writes the same K/V the real replay writes next, so it is harmless; RNG state is restored."""
        saved = self.generator.get_state() if sample is not None else None
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(rows, end, self.masked, sample)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if saved is not None:
            self.generator.set_state(saved)
        graph = torch.cuda.CUDAGraph()
        if sample is not None:
            graph.register_generator_state(self.generator)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self._forward(rows, end, self.masked, sample)
        except Exception as err:  # noqa: BLE001 -- only the optional sampling part may fail; report and fall back
            if sample is None:
                raise
            log.warning("could not capture sampling in the CUDA graph (%s); sampling eagerly after the graph", err)
            self.graph_sampling_failed = True
            torch.cuda.synchronize(self.device)
            return None
        return graph

    # ------------------------------------------------------------------ in-graph RNG
    def graph_sampling_ok(self, generator: Optional[torch.Generator]) -> bool:
        """True when guided_sample can run inside a graph: CUDA graphs on, the fused (sync-free) backend
        selected, a generator on this CUDA device, and guided_sample accepting check_values=False."""
        if not self.use_graphs or self.graph_sampling_failed or generator is None:
            return False
        if generator.device != self.device and not (generator.device.type == "cuda" and self.device.type == "cuda"
                                                     and (generator.device.index or 0) == (self.device.index or 0)):
            return False
        try:
            import inspect

            from .guidance import guided_sample
            from .kernels.dispatch import select_backend
        except ImportError:
            return False
        if "check_values" not in inspect.signature(guided_sample).parameters:
            return False
        return select_backend(self.device) == "triton"

    def adopt_generator(self, generator: torch.Generator) -> torch.Generator:
        """Copy the caller's RNG state into the decoder-owned generator the graphs are registered with."""
        if self.generator is None:
            self.generator = torch.Generator(device=self.device)
        self.generator.set_state(generator.get_state())
        return self.generator

    def return_generator(self, generator: torch.Generator) -> None:
        """Write the advanced RNG state back, so the caller's generator moves on as in the eager engine."""
        generator.set_state(self.generator.get_state())
