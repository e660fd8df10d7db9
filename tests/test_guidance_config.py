"""The mode table, GuidanceConfig validation / token modes, and the per-image seed rule."""
import pytest
import torch

from llamagen_core2.errors import InvalidArgument
from llamagen_core2.guidance.config import MODE_TABLE, GuidanceConfig, Schedule, needs_uncond, needs_weak
from llamagen_core2.guidance.seeding import image_key, image_keys, row_keys


def test_mode_table_says_what_each_mode_needs():
    assert [m for m, spec in MODE_TABLE.items() if spec.uncond] == ["cfg", "slow"]
    assert [m for m, spec in MODE_TABLE.items() if spec.weak] == ["fast", "slow"]
    assert [m for m, spec in MODE_TABLE.items() if not spec.cond_logits] == ["fast"]
    assert needs_uncond(["cond", "slow"]) and not needs_uncond(["cond", "fast"])
    assert needs_weak(["fast"]) and not needs_weak(["cfg", "cond"])


def test_token_modes_apply_schedule_interval_and_unit_scale():
    assert GuidanceConfig(schedule=Schedule("slow", "fast", first_tokens=2)).token_modes(5) == \
        ["slow", "slow", "fast", "fast", "fast"]
    assert GuidanceConfig(schedule=Schedule("fast", "slow", first_fraction=0.5)).token_modes(4) == \
        ["fast", "fast", "slow", "slow"]
    # LlamaGen cfg_interval: CFG on tokens 0..interval+1, cond afterwards.
    assert GuidanceConfig(cfg_interval=1).token_modes(5) == ["cfg", "cfg", "cfg", "cond", "cond"]
    assert GuidanceConfig(cfg_scale=1.0).token_modes(2) == ["cond", "cond"]
    assert GuidanceConfig(mode="slow", cfg_scale=1.0).token_modes(2) == ["slow", "slow"]  # slow keeps W2S
    with pytest.raises(InvalidArgument, match="one mode per token"):
        GuidanceConfig(schedule=["cfg"] * 3).token_modes(4)


@pytest.mark.parametrize("field, value, match", [
    ("mode", "fastest", "mode must be one of"),
    ("cfg_scale", float("nan"), "cfg_scale"),
    ("w2s_scale", -1.0, "w2s_scale"),
    ("temperature", -0.5, "temperature"),
    ("top_k", 2.5, "top_k"),
    ("top_p", 0.0, "top_p"),
    ("cfg_interval", 1.5, "cfg_interval"),
    ("cfg_interval", -2, "cfg_interval"),
    ("schedule", ["cfg", "warp"], "unknown modes"),
    ("schedule", "slow", "schedule must be"),
])
def test_bad_fields_name_themselves(field, value, match):
    with pytest.raises(InvalidArgument, match=match):
        GuidanceConfig(**{field: value})


def test_bad_schedules_name_themselves():
    with pytest.raises(InvalidArgument, match="exactly one of first_tokens"):
        Schedule()
    with pytest.raises(InvalidArgument, match="first_tokens must be an integer"):
        Schedule(first_tokens=2.5)
    with pytest.raises(InvalidArgument, match=r"first_fraction must be in \[0, 1\]"):
        Schedule(first_fraction=1.5)
    with pytest.raises(InvalidArgument, match=r"first_tokens must be in \[0, 4\]"):
        Schedule(first_tokens=5).modes(4)


def test_image_keys_do_not_depend_on_batching():
    assert image_key(0, 0) == 0xE220A8397B1DCDAF & (2 ** 63 - 1)  # splitmix64's first output for seed 0
    whole = image_keys(123, 0, 10)
    assert torch.equal(torch.cat([image_keys(123, 0, 4), image_keys(123, 4, 6)]), whole)
    assert torch.equal(row_keys(3, seed=123, first_index=7), whole[7:])
    assert len(set(whole.tolist())) == 10 and int(whole.min()) >= 0


def test_generators_give_reproducible_keys():
    a = row_keys(4, generator=torch.Generator().manual_seed(5))
    b = row_keys(2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[:2], b)  # one draw from the generator, then the batch-independent rule
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    per_image = row_keys(3, generator=gens)
    assert torch.equal(per_image[1:2], row_keys(1, generator=[torch.Generator().manual_seed(1)]))
    with pytest.raises(InvalidArgument, match="one per image"):
        row_keys(2, generator=gens)
    with pytest.raises(InvalidArgument, match="seed or generator"):
        row_keys(2, seed=1, generator=gens[0])
    with pytest.raises(InvalidArgument, match="seed must be an integer"):
        row_keys(2, seed=-1)


def test_knobs_take_numbers_not_strings_or_bools():
    import numpy as np

    for bad in (dict(cfg_scale="4"), dict(temperature=True), dict(top_p=True), dict(w2s_scale=True),
                dict(top_k=3.0), dict(top_k=torch.tensor([2.0])), dict(cfg_scale=torch.tensor([True]))):
        with pytest.raises(InvalidArgument, match="must be"):
            GuidanceConfig(**bad)
    ok = GuidanceConfig(temperature=np.float32(1.0), cfg_interval=np.int64(3), top_k=np.int64(5),
                        schedule=Schedule(first_tokens=np.int64(2)))
    assert ok.cfg_interval == 3 and type(ok.cfg_interval) is int and ok.token_modes(4)[:2] == ["slow", "slow"]


def test_the_effective_mode_rule_lives_next_to_the_mode_table():
    from llamagen_core2.guidance.config import (MODE_IDS, cfg_is_cond, cfg_mixes, effective_mode, reads_uncond,
                                                sampler_inputs)

    assert list(MODE_IDS) == list(MODE_TABLE) and sorted(MODE_IDS.values()) == list(range(len(MODE_TABLE)))
    assert cfg_is_cond(1.0) and cfg_is_cond(0) and not cfg_is_cond(1.5) and not cfg_is_cond(torch.tensor([0.5]))
    assert cfg_mixes(torch.tensor([0.5, 1.0, 2.0])).tolist() == [False, False, True]
    assert [effective_mode(m, 1.0) for m in MODE_TABLE] == ["cond", "cond", "fast", "slow"]
    assert [effective_mode(m, 3.0) for m in MODE_TABLE] == list(MODE_TABLE)
    assert [reads_uncond(m, 3.0) for m in MODE_TABLE] == [False, True, False, True]
    assert not reads_uncond("cfg", 1.0) and reads_uncond("cfg", torch.tensor([0.5, 2.0]))  # tensors: per row
    c, u, w = object(), object(), object()
    assert sampler_inputs("fast", c, None, w) == ("cond", w, None, None)
    assert sampler_inputs("slow", c, u, w) == ("slow", c, u, w)
    assert GuidanceConfig(cfg_scale=1.0, mode="cfg").token_modes(2) == ["cond", "cond"]
