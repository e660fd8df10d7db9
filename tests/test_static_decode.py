"""Static decode path vs the plain eager path, row compaction vs compute-and-discard, memory refusal,
and a greedy cross-check against the LlamaGen-style baseline decoder (benchmarks/baseline_decoder.py)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from llamagen_core2 import memory
from llamagen_core2.errors import InvalidArgument
from llamagen_core2.generate import generate
from llamagen_core2.guidance_config import make_schedule
from llamagen_core2.static_decode import StaticDecoder
from tiny_models import ScaledCondWeak, captions, tiny_gpt

BUCKET = 4  # 16 image tokens + 1 prefix position -> buckets ending at 4, 8, 12, 16, 17


def _load_baseline():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "baseline_decoder.py"
    spec = importlib.util.spec_from_file_location("baseline_decoder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _static_model(model_type="c2i", **overrides):
    model = tiny_gpt(model_type, **overrides)
    StaticDecoder.for_model(model, bucket=BUCKET)
    return model


def _run(model, cond, engine, **kwargs):
    records = []
    tokens, stats = generate(model, cond, engine=engine, on_step=records.append, return_stats=True, **kwargs)
    return tokens, stats, torch.stack([r.mixed_logits for r in records], 1)


def _assert_same(model, cond, **kwargs):
    t_e, s_e, mixed_e = _run(model, cond, "eager", **kwargs)
    t_s, s_s, mixed_s = _run(model, cond, "static", **kwargs)
    assert torch.equal(t_e, t_s), f"tokens differ at {(t_e != t_s).nonzero()[:5].tolist()}"
    assert s_e == s_s
    err = (mixed_e - mixed_s).abs().max().item()
    assert err < 1e-4, f"mixed logits differ by {err}"
    return t_s, s_s


@pytest.mark.parametrize("mode", ["cond", "cfg", "fast", "slow"])
@pytest.mark.parametrize("batch", [1, 3])
def test_static_matches_eager_every_mode(mode, batch):
    model = _static_model()
    cond = torch.arange(batch) % 10
    tokens, stats = _assert_same(model, cond, mode=mode, cfg_scale=3.0, w2s_scale=1.7, top_k=0, seed=batch,
                                 weak_model=ScaledCondWeak())
    assert tokens.shape == (batch, 16)
    assert stats["step_rows"] == [2 * batch if mode in ("cfg", "slow") else batch] * 16


def test_static_matches_eager_schedule_with_catch_up_and_top_k_top_p():
    model = _static_model()
    schedule = ["cfg"] * 3 + ["fast"] * 5 + ["slow"] * 2 + ["cond"] * 3 + ["cfg"] * 3
    _, stats = _assert_same(model, torch.tensor([2, 7]), schedule=schedule, cfg_scale=2.5, w2s_scale=1.3, top_k=20,
                            top_p=0.9, seed=1, weak_model=ScaledCondWeak())
    assert stats["catchup_calls"] == 2


def test_static_matches_eager_t2i_prefix_mask():
    model = _static_model("t2i")
    feats, mask = captions(model, 2, [3, 6])
    _assert_same(model, feats, cond_mask=mask, schedule=["cond"] * 4 + ["cfg"] * 12, cfg_scale=4.0, top_k=0, seed=2)


def test_static_step_reads_only_the_bucket_and_runs_compacted_rows():
    model = _static_model()
    decoder = StaticDecoder.for_model(model)
    seen = []
    forward = decoder._forward
    decoder._forward = lambda rows, end, masked, sample: (seen.append((rows, end)), forward(rows, end, masked, sample))
    generate(model, torch.tensor([1, 2]), schedule=["slow"] * 6 + ["fast"] * 10, cfg_scale=3.0, top_k=0, seed=0,
             weak_model=ScaledCondWeak(), engine="static")
    positions = range(1, 16)  # token i >= 1 is produced by feeding position T + i - 1 = i
    assert seen == [(4 if i < 6 else 2, min((p // BUCKET + 1) * BUCKET, 17)) for i, p in zip(range(1, 16), positions)]


@pytest.mark.parametrize("engine", ["eager", "static"])
@pytest.mark.parametrize("kwargs", [
    dict(schedule=make_schedule(16, first="slow", then="fast", first_tokens=5)),
    dict(schedule=["cfg"] * 3 + ["fast"] * 5 + ["cfg"] * 8),
    dict(mode="cfg", cfg_interval=4),
], ids=["slow-then-fast", "cfg-fast-cfg", "cfg-interval"])
def test_compaction_equals_compute_and_discard(engine, kwargs):
    """Dropping the uncond rows gives the tokens of LlamaGen's way: run 2B rows every step, discard the half."""
    model = _static_model()
    cond = torch.tensor([3, 8, 1])
    common = dict(cfg_scale=3.0, w2s_scale=1.5, top_k=0, seed=4, weak_model=ScaledCondWeak(), engine=engine, **kwargs)
    compact, s_compact = generate(model, cond, return_stats=True, **common)
    full, s_full = generate(model, cond, return_stats=True, compact_rows=False, **common)
    assert torch.equal(compact, full)
    assert s_full["step_rows"] == [6] * 16 and s_full["catchup_rows"] == 0
    assert s_compact["base_rows"] <= s_full["base_rows"]  # equal when a catch-up prefill redoes the skipped rows


def test_decoder_is_reused_across_calls_and_rebinds_on_new_cache():
    model = _static_model()
    generate(model, torch.tensor([1, 2]), cfg_scale=3.0, seed=0, engine="static")
    decoder = StaticDecoder.for_model(model)
    key = decoder.cache_key
    generate(model, torch.tensor([3, 4]), cfg_scale=3.0, seed=0, engine="static")
    assert StaticDecoder.for_model(model) is decoder and decoder.cache_key == key
    generate(model, torch.arange(5), cfg_scale=3.0, seed=0, engine="static")  # more rows: cache reallocated
    assert decoder.cache_key != key and decoder.tokens_in.shape[0] == 10


def test_kv_cache_estimate_matches_the_allocation():
    model = tiny_gpt()
    for dtype in (torch.float32, torch.bfloat16):
        model.setup_caches(6, 17, dtype=dtype)
        allocated = sum(t.numel() * t.element_size() for c in model.caches for t in (c.k, c.v))
        assert memory.kv_cache_bytes(model.config, 6, 17, dtype) == allocated
        model.release_caches()
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
    need = memory.estimate_generation_bytes(model.config, batch=4, rows=8, num_tokens=16, dtype=torch.float32)
    monkeypatch.setattr(memory, "available_bytes", lambda device: need)  # fits without headroom only
    with pytest.raises(InvalidArgument, match=r"batch 4 \(8 cache rows x 17 positions"):
        generate(model, torch.arange(4), cfg_scale=3.0, seed=0, engine=engine)
    assert not model.caches  # refused before allocating
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
    model = _static_model()
    cond = torch.tensor([0, 5, 9])
    ours = generate(model, cond, mode=mode, temperature=0.0, seed=0, weak_model=ScaledCondWeak(), engine="static",
                    **kwargs)
    ref = baseline.BaselineDecoder(model).generate(cond, mode=mode, temperature=0.0, weak_model=ScaledCondWeak(),
                                                   **kwargs)
    assert torch.equal(ours, ref)


def test_baseline_decoder_t2i_greedy_equals_ours_and_filter_matches_guidance():
    baseline = _load_baseline()
    model = _static_model("t2i")
    feats, mask = captions(model, 2, [2, 6])
    ours = generate(model, feats, cond_mask=mask, cfg_scale=4.0, temperature=0.0, seed=0, engine="static")
    ref = baseline.BaselineDecoder(model).generate(feats, cond_mask=mask, cfg_scale=4.0, temperature=0.0)
    assert torch.equal(ours, ref)
    from llamagen_core2.guidance import filter_logits

    logits = torch.randn(4, 97, generator=torch.Generator().manual_seed(0)) * 3
    ref_f = baseline.top_k_top_p_filter(logits, 30, 0.8)
    assert torch.equal(torch.isinf(ref_f), torch.isinf(filter_logits(logits, top_k=30, top_p=0.8)))


def test_bucket_ends_and_cpu_never_captures_graphs():
    model = _static_model()
    model.setup_caches(2, 17)
    decoder = StaticDecoder.for_model(model)
    decoder.prepare(1)
    assert [decoder.bucket_end(p) for p in (0, 3, 4, 15, 16)] == [4, 4, 8, 16, 17]
    assert not decoder.use_graphs and not decoder.graph_sampling_ok(torch.Generator())
    assert StaticDecoder.for_model(model, bucket=8) is not decoder  # explicit new settings replace it


@pytest.mark.parametrize("mode", ["fast", "slow"])
def test_static_matches_eager_with_the_real_weak_model(mode):
    from llamagen_core2.weak_model import WeakModel

    model = _static_model()
    weak = WeakModel.for_base(model, "W-1", dim=32, n_head=4).eval()
    with torch.no_grad():  # leave the residual start so the weak prediction differs from the cond output
        for p in weak.parameters():
            p.normal_(0, 0.05)
    _assert_same(model, torch.tensor([1, 2]), mode=mode, cfg_scale=3.0, w2s_scale=1.5, top_k=0, seed=5,
                 weak_model=weak)
