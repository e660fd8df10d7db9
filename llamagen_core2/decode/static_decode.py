"""CUDA-graph capture and replay of decode chunks (the engine's fixed-shape steps), keyed by their static shape.

Contract (docs/design.md#decode-engine):
  * `StepGraphs(device).run(key, fn, save_state, restore_state)` replays the graph captured for `key`, capturing
    it on first use: `fn` (a chunk of decode steps that only touches persistent device buffers) runs once eagerly
    on a side stream as the warm-up (Triton JIT, cuBLAS workspaces), the engine's counters/tokens are restored
    with `restore_state(save_state())` so the warm-up is undone, then `fn` is captured and the graph replayed. The
    warm-up's cache writes are the ones the replay repeats (same positions, same inputs, deterministic sampler).
  * All graphs share one memory pool: they are replayed one at a time and none keeps a tensor alive past its
    replay (every result goes to the engine's buffers, allocated outside capture).
  * A graph is valid while every address it recorded is: the engine drops them (`clear`) whenever its caches,
    buffers or the weights move.
"""
from __future__ import annotations

import torch


class StepGraphs:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.graphs: dict = {}
        self.pool = None

    def clear(self) -> None:
        self.graphs.clear()
        self.pool = None

    def run(self, key, fn, save_state, restore_state) -> None:
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(fn, save_state, restore_state)
            self.graphs[key] = graph
        graph.replay()

    def _capture(self, fn, save_state, restore_state) -> "torch.cuda.CUDAGraph":
        saved = save_state()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            fn()
        current.wait_stream(side)
        restore_state(saved)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        return graph
