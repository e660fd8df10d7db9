"""Timed choice between interchangeable implementations of one op, once per (op, device, shape key).

Why: a kernel written without a GPU is a guess (a radix select built on a CPU shipped 5x slower than the kernel
it replaced, docs/sampling.md). Where an op has a fused kernel and a torch path that compute the same thing,
the caller asks a `TimedChoice` which one to run for this device and shape; on CUDA the first ask times every
candidate and keeps the fastest, so a slow kernel is replaced (and reported, one log line) instead of shipped.

Contract:
  * `Candidate(name, backend, run)`: `run()` is one call of the op on representative inputs, graph-capturable
    when the chosen path will run inside a CUDA graph; `backend` is "triton" or "torch" (which
    LLAMAGEN_CORE2_KERNELS value forces it).
  * `TimedChoice(timer=None).choose(op, device, shape_key, candidates) -> name`:
      - LLAMAGEN_CORE2_KERNELS=triton: the first candidate whose backend is "triton"; =torch: the first whose
        backend is "torch" (no timing; read on every call, like kernels.dispatch);
      - auto (default): on CUDA, the fastest by `timer` (ties -> the earlier candidate), decided once per
        (op, device, shape_key) and cached; a candidate whose run or timing raises is skipped (logged); if none
        can be timed, the first. On any other device nothing is timed: the first candidate;
      - one log line per decision (logger "llamagen_core2.kernels", INFO for a timed choice, WARNING when a
        candidate failed), with every candidate's time.
  * The timer is injectable (tests use a fake one): `timer(run, device) -> seconds per call`. The default,
    `cuda_graph_timer`, warms `run` up eagerly on a side stream, captures `calls` back-to-back calls in one CUDA
    graph and times `replays` replays with CUDA events: the GPU time the op costs inside a decode graph, without
    Python launch overhead. Never call `choose` while a CUDA graph is being captured: decide at warm-up.
  * `default_chooser()` is the process-wide chooser the engine uses (decisions persist across Engines, like
    cuDNN's benchmark cache); pass your own TimedChoice for isolated decisions (tests).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import torch

from .backend_setting import requested_backend

logger = logging.getLogger("llamagen_core2.kernels")

Timer = Callable[[Callable[[], object], torch.device], float]


@dataclass(frozen=True)
class Candidate:
    name: str                  # what choose() returns
    backend: str               # "triton" or "torch": the LLAMAGEN_CORE2_KERNELS value that forces this candidate
    run: Callable[[], object]  # one call of the op on representative inputs


def cuda_graph_timer(run: Callable[[], object], device: torch.device, *, calls: int = 10, replays: int = 5,
                     warmup: int = 2) -> float:
    """Seconds per call of `run` replayed from a CUDA graph holding `calls` calls (see the module doc)."""
    device = torch.device(device)
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # Triton JIT, allocator, cuBLAS workspaces: off the capture
            for _ in range(warmup):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                run()
        graph.replay()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) * 1e-3 / (replays * calls)
        del graph
    return seconds


class TimedChoice:
    def __init__(self, timer: Optional[Timer] = None):
        self.timer = timer or cuda_graph_timer
        self.decisions: dict = {}   # (op, device, shape_key) -> chosen name (timed choices only)
        self.timings: dict = {}     # (op, device, shape_key) -> {name: seconds per call, or None if it failed}
        self._logged: set = set()

    def clear(self) -> None:
        self.decisions.clear()
        self.timings.clear()
        self._logged.clear()

    def choose(self, op: str, device, shape_key: Hashable, candidates: Sequence[Candidate]) -> str:
        if not candidates:
            raise ValueError(f"{op}: no candidates to choose from")
        for c in candidates:
            if c.backend not in ("triton", "torch"):
                raise ValueError(f"{op}: candidate {c.name!r} has backend {c.backend!r}, not 'triton' or 'torch'")
        device = torch.device(device)
        key = (op, str(device), shape_key)
        requested = requested_backend()
        if requested != "auto":
            forced = next((c for c in candidates if c.backend == requested), candidates[0])
            self._log_once(key + (requested,), logging.INFO, "%s on %s %s: %s (LLAMAGEN_CORE2_KERNELS=%s)",
                           op, device, shape_key, forced.name, requested)
            return forced.name
        if device.type != "cuda":
            return candidates[0].name  # CPU never times: the interpreter / torch costs say nothing about a GPU
        if key in self.decisions:
            return self.decisions[key]
        times: dict = {}
        failed = []
        for c in candidates:
            try:
                times[c.name] = float(self.timer(c.run, device))
            except Exception as exc:  # a candidate that cannot run or be captured here is not eligible
                times[c.name] = None
                failed.append(f"{c.name}: {type(exc).__name__}: {exc}")
        timed = [c for c in candidates if times[c.name] is not None]
        best = candidates[0]
        if timed:
            best = timed[0]
            for c in timed[1:]:
                if times[c.name] < times[best.name]:  # strict: ties keep the earlier candidate
                    best = c
        self.decisions[key] = best.name
        self.timings[key] = times
        summary = ", ".join(f"{name} {'failed' if t is None else f'{t * 1e6:.1f} us'}" for name, t in times.items())
        level = logging.WARNING if failed else logging.INFO
        self._log_once(key, level, "%s on %s %s: %s (%s)%s", op, device, shape_key, best.name, summary,
                       ("; " + "; ".join(failed)) if failed else "")
        return best.name

    def _log_once(self, key, level, message, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.log(level, "timed choice: " + message, *args)


_default: Optional[TimedChoice] = None


def default_chooser() -> TimedChoice:
    """The process-wide chooser (created on first use with the CUDA-graph timer)."""
    global _default
    if _default is None:
        _default = TimedChoice()
    return _default
