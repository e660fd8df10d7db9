"""The torch guidance reference: mixing formulas, LlamaGen sampling semantics, statistics, errors.

Statistical tests draw N tokens (N rows holding the same logits, one draw per row) and compare the
counts with hand-computed float64 probabilities by Pearson chi-square; the test fails when the
statistic exceeds the chi-square quantile at alpha = 1e-6 (Wilson-Hilferty approximation; a small
alpha because the suite runs ~20 such tests). With 8000 draws this still rejects a sampler whose
temperature is off by 10% (chi2 243 vs 181 at df 99). All generators are seeded, so the tests are
deterministic.
"""
import logging
import math

import numpy as np
import pytest
import torch

from llamagen_core2.errors import InvalidArgument
from llamagen_core2.guidance import filter_logits, guided_sample, mix_guidance, sample_logits

Z_ALPHA = 4.753  # one-sided standard normal quantile for alpha = 1e-6


def chi2_critical(df: int, z: float = Z_ALPHA) -> float:
    """Upper chi-square quantile by the Wilson-Hilferty cube approximation."""
    return df * (1.0 - 2.0 / (9.0 * df) + z * math.sqrt(2.0 / (9.0 * df))) ** 3


def hand_probs(row, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    """float64 LlamaGen semantics written independently of guidance/sampling.py: top-k keeps every value
    >= the k-th largest, top-p keeps sorted tokens whose preceding mass is <= p."""
    x = np.asarray(row, dtype=np.float64) / temperature
    keep = np.ones_like(x, dtype=bool)
    if 0 < top_k < len(x):
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    probs = np.where(keep, np.exp(x - x[keep].max()), 0.0)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
        keep_sorted = before <= top_p
        mask = np.zeros_like(keep)
        mask[order[keep_sorted]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


def assert_follows(tokens: torch.Tensor, probs: np.ndarray, label: str = "") -> None:
    """Tokens never leave the support of `probs` and pass a chi-square test at alpha 1e-6."""
    counts = np.bincount(tokens.cpu().numpy(), minlength=len(probs)).astype(np.float64)
    outside = counts[probs == 0].sum()
    assert outside == 0, f"{label}: {int(outside)} draws outside the support"
    n = counts.sum()
    expected = probs * n
    # Pool bins with expected count < 5 into one so the chi-square approximation holds.
    big = expected >= 5
    obs = np.append(counts[big], counts[(probs > 0) & ~big].sum())
    exp = np.append(expected[big], expected[(probs > 0) & ~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = max(1, len(exp) - 1)
    assert stat < chi2_critical(df), f"{label}: chi2 {stat:.1f} >= {chi2_critical(df):.1f} (df {df})"


def spread_logits(vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 1.5


def gap_top_p(row, temperature=1.0, top_k=0, index=3) -> float:
    """A top_p halfway between two cumulative masses, so float rounding cannot move the cut."""
    probs = hand_probs(row, temperature, top_k)
    cum = np.cumsum(np.sort(probs)[::-1])
    return float((cum[index] + cum[index + 1]) / 2)


# ---------------------------------------------------------------- mixing formulas

def _three(batch=3, vocab=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=g), torch.randn(batch, vocab, generator=g),
            torch.randn(batch, vocab, generator=g))


def test_mix_scalar_scales_match_hand_formulas():
    c, u, w = _three()
    assert torch.equal(mix_guidance(c, u, w, mode="cond", cfg_scale=4.0), c)
    assert torch.equal(mix_guidance(c, u, mode="cfg", cfg_scale=4.0), u + 4.0 * (c - u))
    assert torch.equal(mix_guidance(c, u, w, mode="fast", cfg_scale=4.0), w)
    cfg = u + 4.0 * (c - u)
    assert torch.equal(mix_guidance(c, u, w, mode="slow", cfg_scale=4.0, w2s_scale=2.5), w + 2.5 * (cfg - w))


def test_mix_scale_at_most_one_means_cond_only():
    c, u, w = _three()
    assert torch.equal(mix_guidance(c, u, mode="cfg", cfg_scale=1.0), c)
    assert torch.equal(mix_guidance(c, None, mode="cfg", cfg_scale=0.5), c)
    assert torch.equal(mix_guidance(c, u, w, mode="slow", cfg_scale=1.0, w2s_scale=3.0), w + 3.0 * (c - w))


def test_mix_per_row_scales_match_row_by_row():
    c, u, w = _three(batch=4)
    s = torch.tensor([4.0, 1.0, 0.5, 2.0])
    a = torch.tensor([1.0, 2.0, 0.0, 3.0])
    cfg = mix_guidance(c, u, mode="cfg", cfg_scale=s)
    slow = mix_guidance(c, u, w, mode="slow", cfg_scale=s, w2s_scale=a)
    for i in range(4):
        row_cfg = u[i] + s[i].item() * (c[i] - u[i]) if s[i] > 1 else c[i]
        torch.testing.assert_close(cfg[i], row_cfg, rtol=0, atol=0)
        torch.testing.assert_close(slow[i], w[i] + a[i].item() * (row_cfg - w[i]), rtol=0, atol=1e-7)


def test_slow_with_w2s_one_equals_cfg():
    c, u, w = _three(batch=5, vocab=33)
    slow = mix_guidance(c, u, w, mode="slow", cfg_scale=3.0, w2s_scale=1.0)
    torch.testing.assert_close(slow, mix_guidance(c, u, mode="cfg", cfg_scale=3.0), rtol=0, atol=1e-6)


def test_guided_sample_return_mixed_is_mix_guidance():
    c, u, w = _three(vocab=50)
    tokens, mixed = guided_sample(c, u, w, mode="slow", cfg_scale=2.0, w2s_scale=1.5,
                                  generator=torch.Generator().manual_seed(0), return_mixed=True)
    assert tokens.dtype == torch.long and tokens.shape == (3,)
    assert torch.equal(mixed, mix_guidance(c, u, w, mode="slow", cfg_scale=2.0, w2s_scale=1.5))


# ---------------------------------------------------------------- filtering

def test_top_k_keeps_ties_at_kth_value():
    row = torch.tensor([[5.0, 3.0, 4.0, 3.0, 1.0, 3.0, 0.0]])
    kept = torch.isfinite(filter_logits(row, top_k=3))[0]
    assert kept.tolist() == [True, True, True, True, False, True, False]


def test_top_p_keeps_token_that_crosses_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.6))[0]
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.6, 0.8 crosses: kept
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.4))[0]
    assert kept.tolist() == [True, False, False, False]


def test_per_row_top_k_and_top_p():
    row = spread_logits(40, 1)
    logits = row.expand(3, 40)
    out = filter_logits(logits, top_k=torch.tensor([0, 5, 40]), top_p=torch.tensor([1.0, 1.0, 0.5]))
    kept = torch.isfinite(out)
    assert kept[0].all()
    assert kept[1].sum() == 5 and set(kept[1].nonzero().flatten().tolist()) == set(row.topk(5).indices.tolist())
    assert kept[2].tolist() == (hand_probs(row.numpy(), top_p=0.5) > 0).tolist()


# ---------------------------------------------------------------- sampling statistics

STAT_CASES = [
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=0.7, top_k=20, top_p=1.0),
    dict(temperature=1.3, top_k=0, top_p="gap"),
    dict(temperature=1.0, top_k=30, top_p="gap"),
]


@pytest.mark.parametrize("case", STAT_CASES, ids=lambda c: f"t{c['temperature']}-k{c['top_k']}-p{c['top_p']}")
def test_sample_logits_follows_softmax_of_filtered_logits(case):
    row = spread_logits(111, 7)
    top_p = gap_top_p(row.numpy(), case["temperature"], case["top_k"]) if case["top_p"] == "gap" else 1.0
    tokens = sample_logits(row.expand(8000, -1), temperature=case["temperature"], top_k=case["top_k"],
                           top_p=top_p, generator=torch.Generator().manual_seed(1))
    assert_follows(tokens, hand_probs(row.numpy(), case["temperature"], case["top_k"], top_p), str(case))


def test_sampling_ties_at_kth_value_are_all_drawn():
    row = torch.full((111,), -2.0)
    row[[3, 50, 60, 90]] = torch.tensor([1.0, 0.5, 0.5, 0.5])  # top_k=2 keeps 3 + the three ties
    tokens = sample_logits(row.expand(3000, -1), top_k=2, generator=torch.Generator().manual_seed(2))
    assert set(tokens.tolist()) == {3, 50, 60, 90}
    assert_follows(tokens, hand_probs(row.numpy(), top_k=2), "ties")


def test_temperature_zero_is_greedy_first_index_on_ties():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [3.0, 0.0, 0.0, 3.0]])
    out = sample_logits(logits, temperature=0.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert out.tolist() == [1, 0]


def test_per_row_temperature_mixes_greedy_and_sampled_rows():
    row = torch.zeros(111)
    row[17] = 0.5  # mode of a nearly flat distribution: sampled rows rarely pick it
    temps = torch.tensor([0.0, 1.0] * 200)
    out = sample_logits(row.expand(400, -1), temperature=temps, generator=torch.Generator().manual_seed(3))
    assert (out[0::2] == 17).all()
    assert (out[1::2] != 17).sum() > 150


def test_same_generator_seed_gives_same_tokens():
    c, u, _ = _three(batch=64, vocab=1000)
    a = guided_sample(c, u, cfg_scale=2.0, top_k=100, generator=torch.Generator().manual_seed(5))
    b = guided_sample(c, u, cfg_scale=2.0, top_k=100, generator=torch.Generator().manual_seed(5))
    d = guided_sample(c, u, cfg_scale=2.0, top_k=100, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, d)


def test_single_key_rows_are_independent_draws():
    """One int key for the batch: row b races on counters b * V + j (the layout of
    llamagen_core2.guidance.philox), so the rows are independent draws from the same distribution."""
    row = spread_logits(111, 7)
    tokens = sample_logits(row.expand(8000, -1), top_k=30, seeds=2024)
    assert_follows(tokens, hand_probs(row.numpy(), top_k=30), "one key")


def test_seeds_and_offset_fix_the_draw_and_the_generator_draws_one_key_per_row():
    c, u, _ = _three(batch=64, vocab=1000)
    keys = torch.arange(64) * 104729 + 2 ** 35
    a = guided_sample(c, u, cfg_scale=2.0, top_k=100, seeds=keys, offset=3000)
    assert torch.equal(a, guided_sample(c, u, cfg_scale=2.0, top_k=100, seeds=keys, offset=torch.tensor([3000])))
    assert not torch.equal(a, guided_sample(c, u, cfg_scale=2.0, top_k=100, seeds=keys, offset=4000))
    # a generator gives one key per row from torch.randint on its device, and offset 0
    b = guided_sample(c, u, cfg_scale=2.0, top_k=100, generator=torch.Generator().manual_seed(5))
    drawn = torch.randint(0, 2 ** 63 - 1, (64,), generator=torch.Generator().manual_seed(5), dtype=torch.int64)
    assert torch.equal(b, guided_sample(c, u, cfg_scale=2.0, top_k=100, seeds=drawn, offset=0))
    with pytest.raises(InvalidArgument, match="either seeds .with offset. or generator"):
        guided_sample(c, u, cfg_scale=2.0, seeds=keys, generator=torch.Generator())


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, match", [
    (dict(uncond=torch.zeros(2, 6)), "uncond must have the shape"),
    (dict(weak=torch.zeros(3, 5), mode="slow"), "weak must have the shape"),
    (dict(cfg_scale=torch.ones(3)), r"cfg_scale must be a number or a tensor of shape \[2\]"),
    (dict(w2s_scale=torch.ones(1, 2), mode="slow"), "w2s_scale must be"),
    (dict(cfg_scale=-1.0), "cfg_scale must be >= 0"),
    (dict(cfg_scale=float("nan")), "cfg_scale must be a finite"),
    (dict(mode="fast"), "needs the weak-model prediction"),
    (dict(uncond=None, cfg_scale=3.0), "needs the unconditional output"),
    (dict(mode="bogus"), "mode must be one of"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(top_k=torch.tensor([1, 2, 3])), r"top_k must be a number or a tensor of shape \[2\]"),
])
def test_bad_inputs_raise_invalid_argument(kwargs, match):
    args = dict(uncond=torch.zeros(2, 5), weak=None, mode="cfg", cfg_scale=2.0)
    args.update(kwargs)
    cond = torch.zeros(2, 5)
    with pytest.raises(InvalidArgument, match=match):
        guided_sample(cond, args.pop("uncond"), args.pop("weak"), **args)


def test_guided_sample_rejects_non_matrix_cond():
    with pytest.raises(InvalidArgument, match=r"cond must be \[B, V\]"):
        guided_sample(torch.zeros(5), mode="cond")


def test_torch_backend_env_and_auto_fallback_log_once(monkeypatch, caplog):
    from llamagen_core2.kernels import dispatch

    c, u, _ = _three(vocab=20)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    a = guided_sample(c, u, cfg_scale=2.0, generator=torch.Generator().manual_seed(9))
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    monkeypatch.setattr(dispatch, "_logged_reasons", set())
    with caplog.at_level(logging.INFO, logger="llamagen_core2.kernels"):
        b = guided_sample(c, u, cfg_scale=2.0, generator=torch.Generator().manual_seed(9))
        guided_sample(c, u, cfg_scale=2.0)
    assert torch.equal(a, b)  # auto on CPU is the torch path
    lines = [r for r in caplog.records if "torch reference path" in r.getMessage()]
    assert len(lines) == 1
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-please")
    with pytest.raises(InvalidArgument, match="LLAMAGEN_CORE2_KERNELS must be one of"):
        guided_sample(c, u, cfg_scale=2.0)
