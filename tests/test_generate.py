"""generate(): cached decode vs full recompute for every mode, row dropping, catch-up prefill, seeds, errors."""
import pytest
import torch

from llamagen_core2.decode.generate import generate
from llamagen_core2.errors import InvalidArgument
from llamagen_core2.guidance.config import make_schedule
from llamagen_core2.guidance.seeding import row_keys
from tiny_models import ScaledCondWeak, captions, tiny_gpt


def _recorded(model, cond, **kwargs):
    records = []
    tokens, stats = generate(model, cond, on_step=records.append, return_stats=True, **kwargs)
    return tokens, stats, records


def _reference_mix(model, cond, tokens, records, cfg_scale, w2s_scale=1.0, cond_mask=None):
    """Recompute every step's mixed logits from scratch (no cache) from the recorded modes."""
    with torch.no_grad():
        c = model.logits(cond, tokens, cond_mask=cond_mask)
        u = model.logits(model.null_condition(len(cond), cond), tokens, cond_mask=cond_mask)
    cfg = u + cfg_scale * (c - u)
    weak = 1.5 * c
    out = []
    for r in records:
        i = r.index
        out.append({"cond": c[:, i], "cfg": cfg[:, i], "fast": weak[:, i],
                    "slow": weak[:, i] + w2s_scale * (cfg[:, i] - weak[:, i])}[r.mode])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("mode", ["cond", "cfg", "fast", "slow"])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_mode_matches_full_recompute(mode, batch):
    model = tiny_gpt()
    cond = torch.arange(batch) % 10
    tokens, _, records = _recorded(model, cond, mode=mode, cfg_scale=3.0, w2s_scale=1.7, top_k=0, seed=0,
                                   weak_model=ScaledCondWeak())
    ref = _reference_mix(model, cond, tokens, records, 3.0, 1.7)
    got = torch.stack([r.mixed_logits for r in records], dim=1)
    assert tokens.shape == (batch, 16) and tokens.dtype == torch.long
    assert [r.mode for r in records] == [mode] * 16
    assert (got - ref).abs().max() < 1e-4


def test_schedule_with_catch_up_matches_full_recompute_and_counts_rows():
    model = tiny_gpt()
    cond = torch.tensor([2, 7])
    schedule = ["cfg"] * 3 + ["fast"] * 5 + ["slow"] * 2 + ["cond"] * 3 + ["cfg"] * 3
    weak = ScaledCondWeak()
    tokens, stats, records = _recorded(model, cond, schedule=schedule, cfg_scale=2.5, w2s_scale=1.3, top_k=0, seed=1,
                                       weak_model=weak)
    ref = _reference_mix(model, cond, tokens, records, 2.5, 1.3)
    assert (torch.stack([r.mixed_logits for r in records], 1) - ref).abs().max() < 1e-4
    B = 2
    assert stats["step_rows"] == [2 * B if m in ("cfg", "slow") else B for m in schedule]
    # Uncond rows miss 5 positions (tokens 3..7) before token 8, then 3 (tokens 10..12) before token 13.
    assert stats["catchup_calls"] == 2 and stats["catchup_rows"] == B * (5 + 3)
    assert weak.steps == list(range(16))  # the weak model steps every token: its cache has no holes


def test_catch_up_from_a_skipped_prefill_t2i():
    model = tiny_gpt("t2i")
    feats, mask = captions(model, 2, [3, 6])
    schedule = ["cond"] * 4 + ["cfg"] * 12
    tokens, stats, records = _recorded(model, feats, cond_mask=mask, schedule=schedule, cfg_scale=4.0, top_k=0,
                                       seed=2)
    ref = _reference_mix(model, feats, tokens, records, 4.0, cond_mask=mask)
    assert (torch.stack([r.mixed_logits for r in records], 1) - ref).abs().max() < 1e-4
    T = model.config.cls_token_num
    assert stats["catchup_rows"] == 2 * (T + 3)  # null-caption prefix + tokens 0..2


def test_slow_and_fast_row_counts_formula():
    model = tiny_gpt()
    B, N, K = 3, 16, 5
    cond = torch.tensor([1, 2, 3])
    counted = []
    forward = model.forward_hidden

    def counting(x, cache=None, **kw):  # a prefill of the T prefix positions counts as one row per sequence
        counted.append(x.shape[0] * x.shape[1] if kw.get("start", 0) > 0 or x.shape[1] == 1 else x.shape[0])
        return forward(x, cache, **kw)

    model.forward_hidden = counting
    kw = dict(cfg_scale=3.0, top_k=0, seed=0, weak_model=ScaledCondWeak(), return_stats=True)
    _, fast = generate(model, cond, mode="fast", **kw)
    assert fast["base_rows"] == B * N and sum(counted) == B * N
    counted.clear()
    _, slow = generate(model, cond, mode="slow", **kw)
    assert slow["base_rows"] == 2 * B * N and sum(counted) == 2 * B * N
    counted.clear()
    _, mixed = generate(model, cond, schedule=make_schedule(N, first="slow", then="fast", first_tokens=K), **kw)
    assert mixed["base_rows"] == 2 * B * K + B * (N - K) and mixed["catchup_rows"] == 0
    assert sum(counted) == mixed["base_rows"]


def test_cfg_interval_really_drops_uncond_rows():
    model = tiny_gpt()
    cond = torch.tensor([4, 5])
    seen_rows = []
    forward = model.forward_hidden

    def spy(x, cache=None, **kw):
        seen_rows.append(x.shape[0])
        return forward(x, cache, **kw)

    model.forward_hidden = spy
    tokens, stats, records = _recorded(model, cond, cfg_scale=3.0, cfg_interval=4, top_k=0, seed=3)
    # LlamaGen semantics: CFG on tokens 0..cfg_interval+1, then cond-only on only B rows.
    assert [r.mode for r in records] == ["cfg"] * 6 + ["cond"] * 10
    assert seen_rows == [4] * 6 + [2] * 10
    ref = _reference_mix(model, cond, tokens, records, 3.0)
    assert (torch.stack([r.mixed_logits for r in records], 1) - ref).abs().max() < 1e-4


def test_cfg_scale_one_means_cond_only_on_b_rows():
    model = tiny_gpt()
    _, stats = generate(model, torch.tensor([1, 2]), cfg_scale=1.0, seed=0, return_stats=True)
    assert stats["base_rows"] == 2 * 16


def test_same_seed_or_generator_state_same_tokens():
    model = tiny_gpt()
    cond = torch.tensor([0, 1, 2, 3])
    a = generate(model, cond, cfg_scale=2.0, top_k=0, seed=123)
    b = generate(model, cond, cfg_scale=2.0, top_k=0, seed=123)
    c = generate(model, cond, cfg_scale=2.0, top_k=0, generator=torch.Generator().manual_seed(123))
    d = generate(model, cond, cfg_scale=2.0, top_k=0, generator=torch.Generator().manual_seed(123))
    e = generate(model, cond, cfg_scale=2.0, top_k=0, seed=124)
    assert torch.equal(a, b) and torch.equal(c, d)
    assert not torch.equal(a, e) and not torch.equal(a, c)  # a generator stands for the seed it draws, not its own
    # image i depends on its key alone: the last two images generated on their own are the same
    assert torch.equal(generate(model, cond[2:], cfg_scale=2.0, top_k=0, seeds=row_keys(4, seed=123)[2:]), a[2:])


def test_greedy_equals_argmax_of_cfg_logits():
    model = tiny_gpt()
    cond = torch.tensor([6])
    tokens, _, records = _recorded(model, cond, cfg_scale=2.0, temperature=0.0, seed=0)
    assert torch.equal(tokens[0], torch.stack([r.mixed_logits[0].argmax() for r in records]))


def test_bf16_generation_runs():
    model = tiny_gpt().to(torch.bfloat16)
    tokens = generate(model, torch.tensor([1, 2]), cfg_scale=3.0, seed=0, num_tokens=8)
    assert tokens.shape == (2, 8) and int(tokens.max()) < 97


def test_nan_weights_are_reported():
    model = tiny_gpt()
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        generate(model, torch.tensor([1]), seed=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.5), "temperature"),
    (dict(cfg_scale=float("nan")), "cfg_scale"),
    (dict(cfg_scale=-1.0), "cfg_scale"),
    (dict(w2s_scale=float("inf")), "w2s_scale"),
    (dict(mode="turbo"), "mode must be one of"),
    (dict(mode="fast"), "need a weak_model"),
    (dict(schedule=["cfg"] * 3), "one mode per token"),
    (dict(num_tokens=17), "num_tokens"),
    (dict(cfg_interval=-2), "cfg_interval"),
    (dict(seed=1, generator=torch.Generator()), "seed or generator"),
    (dict(cond_mask=torch.ones(1, 1, dtype=torch.bool)), "cond_mask"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        generate(tiny_gpt(), torch.tensor([1]), **kwargs)


def test_bad_class_ids_raise():
    with pytest.raises(InvalidArgument, match=r"class ids must be in \[0, 9\]"):
        generate(tiny_gpt(), torch.tensor([10]))
    with pytest.raises(InvalidArgument, match="make_schedule|first_tokens"):
        make_schedule(16, first_tokens=17)


def test_empty_batch_raises():
    with pytest.raises(InvalidArgument, match="at least one condition"):
        generate(tiny_gpt(), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_t2i_with_and_without_cfg_matches_full_recompute(cfg_scale):
    model = tiny_gpt("t2i")
    feats, mask = captions(model, 3, [1, 4, 6])
    tokens, stats, records = _recorded(model, feats, cond_mask=mask, cfg_scale=cfg_scale, top_k=0, seed=4)
    ref = _reference_mix(model, feats, tokens, records, cfg_scale, cond_mask=mask)
    assert (torch.stack([r.mixed_logits for r in records], 1) - ref).abs().max() < 1e-4
    assert stats["base_rows"] == (6 if cfg_scale > 1 else 3) * 16


def test_fp16_generation_runs():
    model = tiny_gpt().to(torch.float16)
    tokens = generate(model, torch.tensor([3]), cfg_scale=2.0, seed=0, num_tokens=6)
    assert tokens.shape == (1, 6) and int(tokens.max()) < 97


def _bar_lines(stderr: str) -> list:
    """The states a tqdm bar printed (each redraw starts with a carriage return), non-empty ones only."""
    return [line.strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip()]


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_tokens_progress_bar_reaches_its_total_and_stays(engine, capsys):
    """Issue 19: the bar was last drawn at 33/36 and then erased (leave=False, the final state never redrawn)."""
    gpt = tiny_gpt()
    N = gpt.config.num_image_tokens
    capsys.readouterr()
    generate(gpt, torch.tensor([1, 2]), top_k=0, seed=0, progress=True, engine=engine)
    last = _bar_lines(capsys.readouterr().err)[-1]
    assert last.startswith("tokens: 100%") and f"{N}/{N}" in last, last


def test_meta_tensors_are_refused_with_a_clear_error():
    """Issue 19: a condition on the meta device (no values) failed deep inside with `Tensor.item() cannot be called
    on meta tensors`."""
    gpt, t2i = tiny_gpt(), tiny_gpt("t2i")
    with pytest.raises(InvalidArgument, match=r"cond .*meta"):
        generate(gpt, torch.tensor([1, 2], device="meta"))
    feats, mask = captions(t2i, 2, [3, 6])
    with pytest.raises(InvalidArgument, match=r"cond .*meta"):
        generate(t2i, feats.to("meta"), cond_mask=mask)
    with pytest.raises(InvalidArgument, match=r"cond_mask .*meta"):
        generate(t2i, feats, cond_mask=mask.to("meta"))
    with pytest.raises(InvalidArgument, match=r"tokens .*meta"):
        gpt.logits(torch.tensor([1]), torch.zeros(1, 3, dtype=torch.long, device="meta"))
