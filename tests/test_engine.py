"""The decode engine (static, caller-owned state) vs the plain eager loop, chunking and buckets, row compaction vs
compute-and-discard, memory refusal, and a greedy cross-check against the LlamaGen-style baseline decoder
(benchmarks/baseline_decoder.py)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from llamagen_core2.decode import memory
from llamagen_core2.decode.engine import Engine, chunk_sizes
from llamagen_core2.decode.generate import generate
from llamagen_core2.errors import InvalidArgument
from llamagen_core2.guidance.config import make_schedule
from tiny_models import ScaledCondWeak, captions, tiny_gpt

BUCKET = 4  # 16 image tokens + 1 prefix position -> buckets ending at 4, 8, 12, 16, 17


def _load_baseline():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "baseline_decoder.py"
    spec = importlib.util.spec_from_file_location("baseline_decoder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _engine(model):
    """Small buckets and chunks so 16 tokens cross several of each."""
    return Engine(model, bucket=BUCKET, steps_per_graph=4)


def _run(model, cond, engine, **kwargs):
    records = []
    tokens, stats = generate(model, cond, engine=engine, on_step=records.append, return_stats=True, **kwargs)
    return tokens, stats, torch.stack([r.mixed_logits for r in records], 1)


def _assert_same(model, cond, **kwargs):
    t_e, s_e, mixed_e = _run(model, cond, "eager", **kwargs)
    t_s, s_s, mixed_s = _run(model, cond, _engine(model), **kwargs)
    t_n = generate(model, cond, engine=_engine(model), **kwargs)  # without on_step: multi-step chunks
    assert torch.equal(t_e, t_n), f"tokens differ at {(t_e != t_n).nonzero()[:5].tolist()}"
    assert torch.equal(t_e, t_s), f"tokens differ at {(t_e != t_s).nonzero()[:5].tolist()}"
    assert s_e == s_s
    # Relative: the static step runs the head as one GEMM over [cond; uncond; weak] rows, the eager loop as
    # separate GEMMs, and attention reads masked keys up to the bucket end, so float sums may differ in the last
    # bits (then scaled by the guidance mix): ~10 fp32 ulps measured.
    err = ((mixed_e - mixed_s).abs().max() / mixed_e.abs().max()).item()
    assert err < 1e-5, f"mixed logits differ by {err} (relative)"
    return t_s, s_s


@pytest.mark.parametrize("mode", ["cond", "cfg", "fast", "slow"])
@pytest.mark.parametrize("batch", [1, 3])
def test_static_matches_eager_every_mode(mode, batch):
    model = tiny_gpt()
    cond = torch.arange(batch) % 10
    tokens, stats = _assert_same(model, cond, mode=mode, cfg_scale=3.0, w2s_scale=1.7, top_k=0, seed=batch,
                                 weak_model=ScaledCondWeak())
    assert tokens.shape == (batch, 16)
    assert stats["step_rows"] == [2 * batch if mode in ("cfg", "slow") else batch] * 16


def test_static_matches_eager_schedule_with_catch_up_and_top_k_top_p():
    model = tiny_gpt()
    schedule = ["cfg"] * 3 + ["fast"] * 5 + ["slow"] * 2 + ["cond"] * 3 + ["cfg"] * 3
    _, stats = _assert_same(model, torch.tensor([2, 7]), schedule=schedule, cfg_scale=2.5, w2s_scale=1.3, top_k=20,
                            top_p=0.9, seed=1, weak_model=ScaledCondWeak())
    assert stats["catchup_calls"] == 2


def test_static_matches_eager_t2i_prefix_mask():
    model = tiny_gpt("t2i")
    feats, mask = captions(model, 2, [3, 6])
    _assert_same(model, feats, cond_mask=mask, schedule=["cond"] * 4 + ["cfg"] * 12, cfg_scale=4.0, top_k=0, seed=2)


def test_static_step_reads_only_the_bucket_and_runs_compacted_rows():
    model = tiny_gpt()
    seen = []
    forward = model.forward_hidden

    def spy(x, cache=None, **kw):
        if kw.get("position") is not None:  # a decode step
            seen.append((x.shape[0], kw["max_end"]))
        return forward(x, cache, **kw)

    model.forward_hidden = spy
    generate(model, torch.tensor([1, 2]), schedule=["slow"] * 6 + ["fast"] * 10, cfg_scale=3.0, top_k=0, seed=0,
             weak_model=ScaledCondWeak(), engine=_engine(model))
    positions = range(1, 16)  # token i >= 1 is produced by feeding position T + i - 1 = i
    assert seen == [(4 if i < 6 else 2, min((p // BUCKET + 1) * BUCKET, 17)) for i, p in zip(range(1, 16), positions)]


def test_chunks_follow_modes_buckets_and_the_graph_limit():
    assert chunk_sizes(13, 4) == [4, 4, 4, 1] and chunk_sizes(7, 32) == [4, 2, 1] and chunk_sizes(0, 4) == []
    model = tiny_gpt()
    engine = _engine(model)
    chunks = []
    run_chunk = engine._run_chunk
    engine._run_chunk = lambda request, mode, rows, steps, first, record: (
        chunks.append((mode, rows, steps, first)), run_chunk(request, mode, rows, steps, first, record))
    generate(model, torch.tensor([1, 2]), schedule=["slow"] * 6 + ["fast"] * 10, cfg_scale=3.0, top_k=0, seed=0,
             weak_model=ScaledCondWeak(), engine=engine)
    # slow tokens 1..5 at positions 1..5 (bucket ends 4, 8), fast tokens 6..15 at positions 6..15
    assert chunks == [("slow", 4, 2, 1), ("slow", 4, 1, 3), ("slow", 4, 2, 4), ("fast", 2, 2, 6),
                      ("fast", 2, 4, 8), ("fast", 2, 4, 12)]


@pytest.mark.parametrize("engine", ["eager", "static"])
@pytest.mark.parametrize("kwargs", [
    dict(schedule=make_schedule(16, first="slow", then="fast", first_tokens=5)),
    dict(schedule=["cfg"] * 3 + ["fast"] * 5 + ["cfg"] * 8),
    dict(mode="cfg", cfg_interval=4),
], ids=["slow-then-fast", "cfg-fast-cfg", "cfg-interval"])
def test_compaction_equals_compute_and_discard(engine, kwargs):
    """Dropping the uncond rows gives the tokens of LlamaGen's way: run 2B rows every step, discard the half."""
    model = tiny_gpt()
    cond = torch.tensor([3, 8, 1])
    common = dict(cfg_scale=3.0, w2s_scale=1.5, top_k=0, seed=4, weak_model=ScaledCondWeak(), engine=engine, **kwargs)
    compact, s_compact = generate(model, cond, return_stats=True, **common)
    full, s_full = generate(model, cond, return_stats=True, compact_rows=False, **common)
    assert torch.equal(compact, full)
    assert s_full["step_rows"] == [6] * 16 and s_full["catchup_rows"] == 0
    assert s_compact["base_rows"] <= s_full["base_rows"]  # equal when a catch-up prefill redoes the skipped rows


def test_engine_is_reused_across_calls_and_rebinds_on_new_cache():
    model = tiny_gpt()
    engine = Engine(model)
    generate(model, torch.tensor([1, 2]), cfg_scale=3.0, seed=0, engine=engine)
    cache, binding = engine.cache, engine.binding
    generate(model, torch.tensor([3, 4]), cfg_scale=3.0, seed=0, engine=engine)
    assert engine.cache is cache and engine.binding == binding
    generate(model, torch.arange(5), cfg_scale=3.0, seed=0, engine=engine)  # more rows: cache reallocated
    assert engine.cache is not cache and engine.binding != binding and engine.buffers.tokens_in.shape[0] == 10
    # a longer request after a short one (a benchmark's warm-up): the cache and every buffer grow with it
    small = Engine(model)
    generate(model, torch.tensor([1, 2]), num_tokens=4, seed=0, engine=small)
    assert torch.equal(generate(model, torch.tensor([1, 2]), seed=0, engine=small),
                       generate(model, torch.tensor([1, 2]), seed=0, engine="eager"))
    assert not hasattr(model, "caches") and "_static_decoder" not in model.__dict__  # no state on the model
    with pytest.raises(InvalidArgument, match="another model"):
        generate(tiny_gpt(), torch.tensor([1]), engine=engine)


def test_kv_cache_estimate_matches_the_allocation():
    model = tiny_gpt()
    for dtype in (torch.float32, torch.bfloat16):
        cache = model.new_cache(6, 17, dtype=dtype)
        allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
        assert memory.kv_cache_bytes(model.config, 6, 17, dtype) == allocated
    est = memory.estimate_generation_bytes(model.config, batch=3, rows=6, num_tokens=16, dtype=torch.float32)
    assert est > memory.kv_cache_bytes(model.config, 6, 17, torch.float32) + 6 * 97 * 4
    resident = memory.estimate_generation_bytes(model.config, batch=3, rows=6, num_tokens=16, dtype=torch.float32,
                                                cache_resident=True)
    assert est - resident == memory.kv_cache_bytes(model.config, 6, 17, torch.float32)


def test_available_memory_is_read_and_check_fits_refuses():
    free = memory.available_bytes("cpu")
    assert free is not None and free > 0
    memory.check_fits(1000, "cpu", "tiny", available=10_000)
    with pytest.raises(InvalidArgument, match="batch 64 needs about .* only"):
        memory.check_fits(10_000, "cpu", "batch 64", available=10_000)


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_generate_refuses_a_batch_that_does_not_fit(monkeypatch, engine):
    model = tiny_gpt()
    engine = Engine(model) if engine == "static" else engine
    need = memory.estimate_generation_bytes(model.config, batch=4, rows=8, num_tokens=16, dtype=torch.float32)
    monkeypatch.setattr(memory, "available_bytes", lambda device: need)  # fits without headroom only
    with pytest.raises(InvalidArgument, match=r"batch 4 \(8 cache rows x 17 positions"):
        generate(model, torch.arange(4), cfg_scale=3.0, seed=0, engine=engine)
    assert engine == "eager" or engine.cache is None  # refused before allocating
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * need)
    assert generate(model, torch.arange(4), cfg_scale=3.0, seed=0, engine=engine).shape == (4, 16)


def test_bad_engine_raises():
    with pytest.raises(InvalidArgument, match="engine must be one of"):
        generate(tiny_gpt(), torch.tensor([1]), engine="graph")


@pytest.mark.parametrize("mode,kwargs", [
    ("cfg", dict(cfg_scale=3.0)),
    ("cond", dict(cfg_scale=3.0)),
    ("slow", dict(cfg_scale=2.0, w2s_scale=1.5)),
    ("cfg", dict(cfg_scale=3.0, cfg_interval=3)),
])
def test_baseline_decoder_greedy_equals_ours(mode, kwargs):
    baseline = _load_baseline()
    model = tiny_gpt()
    cond = torch.tensor([0, 5, 9])
    ours = generate(model, cond, mode=mode, temperature=0.0, seed=0, weak_model=ScaledCondWeak(), engine="static",
                    **kwargs)
    ref = baseline.BaselineDecoder(model).generate(cond, mode=mode, temperature=0.0, weak_model=ScaledCondWeak(),
                                                   **kwargs)
    assert torch.equal(ours, ref)


def test_baseline_decoder_t2i_greedy_equals_ours_and_filter_matches_guidance():
    baseline = _load_baseline()
    model = tiny_gpt("t2i")
    feats, mask = captions(model, 2, [2, 6])
    ours = generate(model, feats, cond_mask=mask, cfg_scale=4.0, temperature=0.0, seed=0, engine="static")
    ref = baseline.BaselineDecoder(model).generate(feats, cond_mask=mask, cfg_scale=4.0, temperature=0.0)
    assert torch.equal(ours, ref)
    from llamagen_core2.guidance import filter_logits

    logits = torch.randn(4, 97, generator=torch.Generator().manual_seed(0)) * 3
    ref_f = baseline.top_k_top_p_filter(logits, 30, 0.8)
    assert torch.equal(torch.isinf(ref_f), torch.isinf(filter_logits(logits, top_k=30, top_p=0.8)))


def test_cpu_never_captures_graphs_and_bad_settings_are_refused():
    model = tiny_gpt()
    engine = Engine(model)
    generate(model, torch.tensor([1]), seed=0, engine=engine)
    assert not engine.use_graphs and engine.graphs is None
    with pytest.raises(InvalidArgument, match="bucket must be an integer >= 1"):
        Engine(model, bucket=0)
    with pytest.raises(InvalidArgument, match="steps_per_graph"):
        Engine(model, steps_per_graph=2.5)


def test_baseline_step_traces_as_one_graph():
    """The compiled baseline wraps its step in torch.compile(fullgraph=True): it must trace without breaks."""
    baseline = _load_baseline()
    model = tiny_gpt()
    cond = torch.tensor([0, 5])
    eager = baseline.BaselineDecoder(model).generate(cond, cfg_scale=3.0, temperature=0.0)
    compiled = baseline.BaselineDecoder(model, compile=True, compile_backend="eager")
    torch._dynamo.reset()
    compiled.generate(cond, cfg_scale=3.0, temperature=0.0, num_tokens=4)  # a benchmark's short warm-up ...
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    traced = compiled.generate(cond, cfg_scale=3.0, temperature=0.0)  # ... then the timed full image
    assert torch.equal(eager, traced)
    assert graphs == 1 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompile


@pytest.mark.parametrize("mode", ["fast", "slow"])
def test_static_matches_eager_with_the_real_weak_model(mode):
    from llamagen_core2.core2.weak_model import WeakModel

    model = tiny_gpt()
    weak = WeakModel.for_base(model, "W-1", dim=32, n_head=4).eval()
    with torch.no_grad():  # leave the residual start so the weak prediction differs from the cond output
        for p in weak.parameters():
            p.normal_(0, 0.05)
    _assert_same(model, torch.tensor([1, 2]), mode=mode, cfg_scale=3.0, w2s_scale=1.5, top_k=0, seed=5,
                 weak_model=weak)


@pytest.mark.parametrize("kernels_env", ["auto", "triton"])
@pytest.mark.parametrize("case", ["c2i-slow-then-fast-catch-up", "t2i-cond-then-cfg"])
def test_fused_step_on_cpu_gives_the_eager_tokens(case, kernels_env, single_thread, monkeypatch):
    """engine="static" with the Triton backend runs the fused step on CPU (kernels interpreted): the block ops, the
    in-step fused sampler and the device counters give exactly the tokens of the eager torch loop. With
    LLAMAGEN_CORE2_KERNELS=auto the CPU keeps the unfused layer (the guard never times on a CPU); =triton forces
    the fused decode-layer kernels (decode_ops.py) for the base model's and the weak model's trunks."""
    kernels = pytest.importorskip("llamagen_core2.kernels.decode_attention")
    if not kernels.INTERPRETED:
        pytest.skip("on CUDA the gpu tests cover the compiled kernels")
    monkeypatch.setenv("LLAMAGEN_CORE2_KERNELS", kernels_env)
    if case.startswith("c2i"):
        from llamagen_core2.core2.weak_model import WeakModel

        model = tiny_gpt()
        weak = WeakModel.for_base(model, "W-1", dim=32, n_head=4, fingerprint=False).eval()
        with torch.no_grad():
            for p in weak.parameters():
                p.normal_(0, 0.05)
        cond, kw = torch.tensor([1, 2, 3]), dict(schedule=["fast"] * 5 + ["slow"] * 11, weak_model=weak,
                                                 w2s_scale=1.5, top_k=20, top_p=0.9)
    else:
        model = tiny_gpt("t2i")
        cond, mask = captions(model, 3, [3, 6, 1])
        kw = dict(cond_mask=mask, schedule=["cond"] * 4 + ["cfg"] * 12, top_k=0)
    eager, s_e = generate(model, cond, seed=2, cfg_scale=4.0, engine="eager", return_stats=True, **kw)
    engine = Engine(model, backend="triton", steps_per_graph=4)
    fused, s_f = generate(model, cond, seed=2, cfg_scale=4.0, engine=engine, return_stats=True, **kw)
    assert torch.equal(eager, fused) and s_e == s_f
    expected = (kernels_env == "triton",) * 4
    assert engine.request.decode_ops and all(ops.key == expected for ops in engine.request.decode_ops.values())


class NaNAfterWeak(ScaledCondWeak):
    """A weak model whose prediction turns NaN from token `bad` on (its weights are fine: a runtime blow-up)."""

    def __init__(self, bad: int):
        super().__init__()
        self.bad = bad

    def step_hidden(self, hidden_cond, cache, *, start=None, position=None, max_end=None, backend="torch"):
        out = super().step_hidden(hidden_cond, cache, start=start, position=position, max_end=max_end)
        return out * float("nan") if self.steps[-1] >= self.bad else out


@pytest.mark.parametrize("engine", ["eager", "static"])
@pytest.mark.parametrize("mode", ["fast", "slow"])
def test_a_weak_model_that_produces_nan_is_reported_not_sampled(engine, mode):
    model = tiny_gpt()
    engine = _engine(model) if engine == "static" else engine
    with pytest.raises(FloatingPointError, match="weak model"):
        generate(model, torch.tensor([1, 2]), mode=mode, weak_model=NaNAfterWeak(bad=7), seed=0, engine=engine)
    tokens = generate(model, torch.tensor([1, 2]), mode=mode, weak_model=NaNAfterWeak(bad=99), seed=0, engine=engine)
    assert tokens.shape == (2, 16)  # the same run without the NaN goes through


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_a_base_model_that_produces_nan_is_reported(engine):
    model = tiny_gpt()
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[0, 0] = float("inf")
    engine = _engine(model) if engine == "static" else engine
    with pytest.raises(FloatingPointError, match="non-finite"):
        generate(model, torch.tensor([1, 2]), cfg_scale=3.0, seed=0, engine=engine)


def test_graph_inputs_keep_their_addresses_across_requests():
    """Everything a captured step reads must sit at the same address in the next request (else a replay reads
    freed memory): the caches and their t2i masks, the buffers, the models' parameters and buffers (RoPE).
    A request without the weak model does not drop the weak model's state either."""
    from llamagen_core2.core2.weak_model import WeakModel

    model = tiny_gpt("t2i")
    weak = WeakModel.for_base(model, "W-1", dim=32, n_head=4, fingerprint=False).eval()
    feats, mask = captions(model, 2, [3, 5])
    engine = Engine(model)

    def addresses():
        return (engine.binding, engine.cache.key_valid.data_ptr(), engine.weak_cache.key_valid.data_ptr(),
                engine.buffers.tokens_in.data_ptr(), engine.buffers.counters.all.data_ptr(),
                engine.buffers.knobs["top_k"].data_ptr())

    generate(model, feats, cond_mask=mask, mode="slow", weak_model=weak, seed=0, engine=engine)
    first = addresses()
    other_feats, other_mask = captions(model, 2, [6, 1], seed=3)
    generate(model, other_feats, cond_mask=other_mask, mode="cfg", seed=1, engine=engine)  # no weak model
    generate(model, other_feats, cond_mask=other_mask, mode="fast", weak_model=weak, seed=1, engine=engine)
    assert addresses() == first
    assert torch.equal(engine.cache.key_valid[:2, :6], other_mask)  # rewritten in place, not reallocated
    weak.to(torch.float32)  # a no-op cast rebuilds nothing the graphs read...
    generate(model, feats, cond_mask=mask, mode="fast", weak_model=weak, seed=0, engine=engine)
    assert engine.binding == first[0]
    weak.rope = weak.rope.clone()  # ...but a moved buffer rebinds (graphs dropped)
    generate(model, feats, cond_mask=mask, mode="fast", weak_model=weak, seed=0, engine=engine)
    assert engine.binding != first[0]


def test_filter_flags_and_the_select_path_join_the_graph_key(monkeypatch, single_thread):
    """The request's filter flags (read on the host once per request) and the sampler's select path (chosen
    before capture) are part of every graph key, so a graph captured for an unfiltered request is never
    replayed for a filtered one; with the torch select path inside the graphs the tokens are the eager loop's.
    On CPU nothing is captured: a stand-in StepGraphs records the keys and runs each chunk eagerly."""
    kernels = pytest.importorskip("llamagen_core2.kernels.decode_attention")
    if not kernels.INTERPRETED:
        pytest.skip("on CUDA the gpu tests cover the captured graphs")
    from llamagen_core2.decode import engine as engine_module
    from llamagen_core2.guidance import filter_flags
    from llamagen_core2.kernels import dispatch

    keys, asked = [], []

    class RecordingGraphs:
        def __init__(self, device):
            pass

        def clear(self):
            pass

        def run(self, key, fn, save_state, restore_state):
            keys.append(key)
            fn()

    def choose(device, batch, vocab, filters, candidates):
        asked.append((batch, vocab, filters))
        return "torch" if any(filters) else "kernel"

    monkeypatch.setattr(engine_module, "StepGraphs", RecordingGraphs)
    monkeypatch.setattr(Engine, "use_graphs", property(lambda self: True))
    monkeypatch.setattr(dispatch, "choose_sampler_select", choose)
    model = tiny_gpt()
    engine = Engine(model, backend="triton", steps_per_graph=4)
    cond = torch.tensor([3, 8, 1])
    for knobs, flags, select in ((dict(top_k=0), (False, False), "kernel"), (dict(top_k=20), (True, False), "torch"),
                                 (dict(top_k=20, top_p=0.8), (True, True), "torch"),
                                 (dict(top_k=torch.tensor([0, 30, 0]), temperature=torch.tensor([1.0, 0.0, 1.0])),
                                  (False, False), "kernel")):  # the only top-k row is greedy: no filter
        keys.clear()
        tokens = generate(model, cond, cfg_scale=3.0, seed=4, engine=engine, **knobs)
        assert torch.equal(tokens, generate(model, cond, cfg_scale=3.0, seed=4, engine="eager", **knobs)), knobs
        assert keys and all(key[-2:] == (flags, select) for key in keys), (knobs, keys[:2])
        assert asked[-1] == (3, model.config.vocab_size, flags)
    assert filter_flags(1.0, 0, 1.0, 97) == (False, False) and filter_flags(1.0, 97, 1.0, 97) == (False, False)
    assert filter_flags(torch.tensor([0.0, 1.0]), torch.tensor([5, 0]), 0.9, 97) == (False, True)
