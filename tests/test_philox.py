"""The torch Philox stream against Triton's tl.rand, and the counter layout both backends share.

`philox_uniform` must reproduce `tl.rand(seed, offset + j)` bit for bit (the fused kernel races on
tl.rand, the torch reference on philox_uniform). The probe kernel runs under the Triton interpreter
on CPU (tests/conftest.py) or compiled on a GPU.
"""
import pytest
import torch

from llamagen_core2.errors import InvalidArgument
from llamagen_core2.guidance.philox import (check_offset, check_seeds, counter_strides, counters_per_draw,
                                            per_row_offsets, philox_uniform, race_uniforms)

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from llamagen_core2.kernels import fused_guided_sample as fgs  # noqa: E402

DEVICE = "cpu" if fgs.INTERPRETED else "cuda"
SEEDS = [0, 1, 12345, 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 7, 2 ** 40 + 3, 2 ** 62 + 11,
         2 ** 63 - 2 ** 31, 2 ** 63 - 2, 2 ** 63 - 1]
OFFSETS = [0, 5, 2 ** 31 - 100, 2 ** 32 - 50, 2 ** 40 + 17, 2 ** 62]


@triton.jit
def _rand_probe(seeds_ptr, offset_ptr, out_ptr, VOCAB: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, VOCAB)
    uniform = tl.rand(tl.load(seeds_ptr + row), tl.load(offset_ptr) + cols)
    tl.store(out_ptr + row * VOCAB + cols, uniform)


@pytest.mark.parametrize("offset", OFFSETS)
def test_philox_uniform_is_bit_identical_to_tl_rand(offset):
    """Seeds across both 32-bit key words (>= 2**32, near 2**63) and offsets across both counter
    words (>= 2**32): the key split, the counter layout, 10 rounds and the float conversion."""
    vocab = 64
    seeds = torch.tensor(SEEDS, dtype=torch.int64)
    out = torch.empty(len(SEEDS), vocab, device=DEVICE)
    _rand_probe[(len(SEEDS),)](seeds.to(DEVICE), torch.tensor([offset], device=DEVICE), out, VOCAB=vocab)
    ours = philox_uniform(seeds, offset, vocab)
    assert torch.equal(out.cpu().view(torch.int32), ours.view(torch.int32))
    assert torch.equal(ours, philox_uniform(seeds, torch.tensor([offset]), vocab))  # device-resident offset


def test_uniforms_are_in_the_unit_interval_and_look_uniform():
    u = philox_uniform(torch.tensor([7, 2 ** 40]), 0, 50_000)
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert not torch.equal(u[0], u[1])


def test_layout_rule_single_key_rows_are_consecutive_counter_blocks():
    """One key: row b uses counters offset + b * V + j, i.e. the rows a per-row layout would draw
    with that key at offsets offset + b * V; [B] keys: counters offset + j for every row."""
    batch, vocab, key = 3, 10, torch.tensor([99])
    single = race_uniforms(key, 40, batch, vocab)
    for b in range(batch):
        assert torch.equal(single[b], philox_uniform(key, 40 + b * vocab, vocab)[0])
    keys = torch.tensor([5, 6, 7])
    per_row = race_uniforms(keys, 40, batch, vocab)
    assert torch.equal(per_row, philox_uniform(keys, 40, vocab))
    assert counter_strides(1, vocab) == (0, 0, vocab) and counter_strides(3, vocab) == (1, 0, 0)
    assert counters_per_draw(1, batch, vocab) == batch * vocab and counters_per_draw(3, batch, vocab) == vocab


@pytest.mark.parametrize("keys", [torch.tensor([99]), torch.tensor([5, 6, 7, 2 ** 40])], ids=["one_key", "per_row_keys"])
def test_per_row_offsets_draw_what_a_one_row_call_draws(keys):
    """offset [B]: row b uses counters offset[b] + j, whatever the keys -- the stream a one-row call with
    offset[b] (and row b's key) draws. Offsets across both counter words and a repeated one."""
    batch, vocab = 4, 37
    offsets = torch.tensor([0, 2 ** 32 - 5, 123456789012, 0])
    drawn = race_uniforms(keys, offsets, batch, vocab)
    for b in range(batch):
        key = keys[b:b + 1] if keys.numel() > 1 else keys
        assert torch.equal(drawn[b], race_uniforms(key, int(offsets[b]), 1, vocab)[0])
        assert torch.equal(drawn[b], race_uniforms(key, offsets[b:b + 1], 1, vocab)[0])
    assert per_row_offsets(offsets, batch) and not per_row_offsets(offsets[:1], batch) and not per_row_offsets(7, 4)
    # a scalar offset with one key is the per-row offsets offset + b * V
    if keys.numel() == 1:
        assert torch.equal(race_uniforms(keys, 40, batch, vocab),
                           race_uniforms(keys, 40 + torch.arange(batch) * vocab, batch, vocab))
    assert counter_strides(keys.numel(), vocab, True) == ((1 if keys.numel() > 1 else 0), 1, 0)
    assert counters_per_draw(1, batch, vocab, per_row_offsets=True) == vocab


def test_per_row_offsets_match_tl_rand():
    """The per-row layout against Triton's tl.rand directly (the kernel's noise), one key per row."""
    seeds = torch.tensor(SEEDS[:5], dtype=torch.int64)
    offsets = torch.tensor([0, 5, 2 ** 32 - 50, 2 ** 40 + 17, 2 ** 62])
    vocab = 64
    out = torch.empty(len(seeds), vocab, device=DEVICE)
    for b in range(len(seeds)):
        _rand_probe[(1,)](seeds[b:b + 1].to(DEVICE), offsets[b:b + 1].to(DEVICE), out[b:b + 1], VOCAB=vocab)
    ours = philox_uniform(seeds, offsets, vocab)
    assert torch.equal(out.cpu().view(torch.int32), ours.view(torch.int32))


@pytest.mark.parametrize("call, match", [
    (lambda: philox_uniform(torch.tensor([1.0]), 0, 4), "seeds must be an int64 tensor"),
    (lambda: philox_uniform(torch.tensor([1]), 0, 0), "vocab must be a positive int"),
    (lambda: check_seeds(-3, 2, 4, "cpu"), r"seeds must be an int in \[0, 2\*\*63\)"),
    (lambda: check_seeds(torch.zeros(3, dtype=torch.long), 2, 4, "cpu"), "with 1 or 2 .one per row. elements"),
    (lambda: check_seeds(torch.zeros(2), 2, 4, "cpu"), "seeds must be an int, or an integer tensor"),
    (lambda: check_seeds(0, 2 ** 16, 2 ** 16, "cpu"), r"at most 2\*\*31 - 1 are supported"),
    (lambda: check_offset(-1, 2, 4, 1), r"offset must be an int in \[0, 2\*\*63 - 8\]"),
    # [B] offsets are valid (one counter base per row); any other size is refused
    (lambda: check_offset(torch.zeros(3, dtype=torch.long), 2, 4, 1), r"offset must be an int or an integer tensor "
                                                                       r"with 1 or 2 \(one per row\) elements"),
    (lambda: philox_uniform(torch.tensor([1, 2]), torch.zeros(3, dtype=torch.long), 4), "with 1 or 2"),
])
def test_bad_keys_and_offsets_raise_invalid_argument(call, match):
    with pytest.raises(InvalidArgument, match=match):
        call()
