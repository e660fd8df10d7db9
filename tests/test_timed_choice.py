"""kernels/timed_choice.py: the guard that times interchangeable implementations once per (op, device, shape)
and keeps the faster, tested on CPU with a fake timer (no GPU needed: only the device's type is looked at);
and the sampler's use of it (kernels/dispatch.choose_sampler_select)."""
import logging

import pytest
import torch

from llamagen_core2.kernels import dispatch
from llamagen_core2.kernels.timed_choice import Candidate, TimedChoice, default_chooser

CUDA = torch.device("cuda", 0)  # never touched: the fake timer runs nothing on it


class FakeTimer:
    """Seconds per call by candidate name; records every timing asked for."""

    def __init__(self, seconds: dict):
        self.seconds = dict(seconds)
        self.calls = []

    def __call__(self, run, device):
        name = run()
        self.calls.append((name, str(device)))
        value = self.seconds[name]
        if isinstance(value, Exception):
            raise value
        return value


def candidates(*names_backends):
    return [Candidate(name, backend, (lambda n=name: n)) for name, backend in names_backends]


FUSED_TORCH = (("fused", "triton"), ("torch", "torch"))


@pytest.fixture(autouse=True)
def auto_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")


def test_picks_the_faster_and_caches_per_key(caplog):
    timer = FakeTimer({"fused": 30e-6, "torch": 10e-6})
    chooser = TimedChoice(timer)
    with caplog.at_level(logging.INFO, logger="llamagen_core2.kernels"):
        assert chooser.choose("op", CUDA, (64, 16384), candidates(*FUSED_TORCH)) == "torch"
        assert chooser.choose("op", CUDA, (64, 16384), candidates(*FUSED_TORCH)) == "torch"  # cached
    assert timer.calls == [("fused", "cuda:0"), ("torch", "cuda:0")]  # each timed once
    lines = [r.getMessage() for r in caplog.records if "timed choice" in r.getMessage()]
    assert len(lines) == 1 and "op on cuda:0 (64, 16384): torch" in lines[0] and "fused 30.0 us" in lines[0]
    assert chooser.timings[("op", "cuda:0", (64, 16384))] == {"fused": 30e-6, "torch": 10e-6}


def test_a_new_key_is_decided_again():
    timer = FakeTimer({"fused": 5e-6, "torch": 9e-6})
    chooser = TimedChoice(timer)
    assert chooser.choose("op", CUDA, (1, 16384), candidates(*FUSED_TORCH)) == "fused"
    timer.seconds = {"fused": 50e-6, "torch": 9e-6}
    assert chooser.choose("op", CUDA, (256, 16384), candidates(*FUSED_TORCH)) == "torch"   # new shape
    assert chooser.choose("other", CUDA, (1, 16384), candidates(*FUSED_TORCH)) == "torch"  # new op
    assert chooser.choose("op", torch.device("cuda", 1), (1, 16384), candidates(*FUSED_TORCH)) == "torch"
    assert chooser.choose("op", CUDA, (1, 16384), candidates(*FUSED_TORCH)) == "fused"     # still cached
    assert len(timer.calls) == 8
    chooser.clear()
    assert chooser.choose("op", CUDA, (1, 16384), candidates(*FUSED_TORCH)) == "torch"
    assert len(timer.calls) == 10


def test_ties_keep_the_first_candidate():
    chooser = TimedChoice(FakeTimer({"fused": 7e-6, "torch": 7e-6, "third": 7e-6}))
    assert chooser.choose("op", CUDA, 1, candidates(*FUSED_TORCH, ("third", "torch"))) == "fused"
    chooser = TimedChoice(FakeTimer({"fused": 7e-6, "torch": 7e-6}))
    assert chooser.choose("op", CUDA, 1, candidates(("torch", "torch"), ("fused", "triton"))) == "torch"


def test_env_override_forces_a_backend_without_timing(monkeypatch, caplog):
    timer = FakeTimer({"fused": 1.0, "torch": 1e-6})
    chooser = TimedChoice(timer)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with caplog.at_level(logging.INFO, logger="llamagen_core2.kernels"):
        assert chooser.choose("op", CUDA, 1, candidates(*FUSED_TORCH)) == "fused"
        assert chooser.choose("op", CUDA, 1, candidates(*FUSED_TORCH)) == "fused"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert chooser.choose("op", CUDA, 1, candidates(*FUSED_TORCH)) == "torch"
    assert timer.calls == [] and chooser.decisions == {}  # forced choices are neither timed nor cached
    forced = [r.getMessage() for r in caplog.records if "LLAMAGEN_CORE2_KERNELS=triton" in r.getMessage()]
    assert len(forced) == 1  # logged once per (key, setting)
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert chooser.choose("op", CUDA, 1, candidates(*FUSED_TORCH)) == "torch"  # auto times: torch is faster
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(Exception, match="LLAMAGEN_CORE2_KERNELS must be one of"):
        chooser.choose("op", CUDA, 2, candidates(*FUSED_TORCH))


def test_cpu_never_times():
    timer = FakeTimer({"fused": 1.0, "torch": 1e-6})
    chooser = TimedChoice(timer)
    assert chooser.choose("op", "cpu", 1, candidates(*FUSED_TORCH)) == "fused"
    assert timer.calls == [] and chooser.decisions == {}


def test_a_failing_candidate_is_skipped_and_reported(caplog):
    timer = FakeTimer({"fused": RuntimeError("operation not permitted when stream is capturing"), "torch": 2e-5})
    chooser = TimedChoice(timer)
    with caplog.at_level(logging.INFO, logger="llamagen_core2.kernels"):
        assert chooser.choose("op", CUDA, 3, candidates(*FUSED_TORCH)) == "torch"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "fused failed" in warnings[0].getMessage() and "RuntimeError" in warnings[0].getMessage()
    every_fails = TimedChoice(FakeTimer({"fused": ValueError("x"), "torch": ValueError("y")}))
    assert every_fails.choose("op", CUDA, 3, candidates(*FUSED_TORCH)) == "fused"  # nothing timed: the first


def test_bad_candidates_are_refused():
    chooser = TimedChoice(FakeTimer({}))
    with pytest.raises(ValueError, match="no candidates"):
        chooser.choose("op", CUDA, 1, [])
    with pytest.raises(ValueError, match="backend 'cuda'"):
        chooser.choose("op", CUDA, 1, candidates(("fused", "cuda")))


def test_the_sampler_asks_the_default_chooser_only_with_filters(monkeypatch):
    """choose_sampler_select: no filters -> 'kernel' without building candidates; with filters the default
    chooser decides per (batch, V, flags) -- on CPU without timing ('kernel'), with a fake CUDA timing the
    faster path."""
    built = []

    def make():
        built.append(1)
        return candidates(("kernel", "triton"), ("torch", "torch"))

    assert dispatch.choose_sampler_select("cpu", 8, 16384, (False, False), make) == "kernel" and built == []
    assert dispatch.choose_sampler_select("cpu", 8, 16384, (True, False), make) == "kernel"
    chooser = default_chooser()
    saved = chooser.timer
    try:
        chooser.timer = FakeTimer({"kernel": 9e-6, "torch": 3e-6})
        assert dispatch.choose_sampler_select(CUDA, 8, 16384, (True, False), make) == "torch"
        assert ("guided_sample.select", "cuda:0", (8, 16384, (True, False))) in chooser.decisions
    finally:
        chooser.timer = saved
        chooser.clear()
