"""The transformer block's non-GEMM ops: Triton kernels vs torch references, references vs LlamaGen's math.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), in fp32 on small odd shapes. fp16 is checked too where the
interpreter is faithful (numpy's float16 casts round to nearest even, as the GPU does); its bf16 casts
truncate, so bf16 kernels are covered by the sm_90a ptxas compile test and by a GPU run, not here.
Tolerances (fp32 unless said otherwise), and why:
  * rope_kv_write: bit-exact -- the same IEEE fp32 multiplies and subtractions in the same order.
  * add_rmsnorm: h bit-exact (one correctly rounded add); normed within 4 ulp and atol = rtol = 1e-6: the
    sum of squares is reduced in a different order than torch's mean (a few ulp apart for d in the
    thousands), which moves 1/rms by ~1-2 ulp, and the two products after it each round. Measured: 73-94% of
    values bit-identical, at most 4 ulp, for d in {37, 100, 768, 1280, 3200}.
  * swiglu: atol = rtol = 1e-6: exp is numpy's (interpreter) vs torch's vectorised expf, ~1 ulp each.
  * decode_attention: atol = rtol = 2e-6: online softmax (per-tile rescaling, exp2 with log2(e) folded into
    the scale, partials combined across splits) rounds differently from SDPA's one softmax.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llamagen_core2.decode import block_ops
from llamagen_core2.decode.model import FeedForward, rope_table_2d
from llamagen_core2.errors import InvalidArgument
from tiny_models import tiny_gpt, tiny_gpt_config

dispatch = pytest.importorskip("llamagen_core2.kernels.dispatch")
attention_kernel = pytest.importorskip("llamagen_core2.kernels.decode_attention")
rope_kernel = pytest.importorskip("llamagen_core2.kernels.rope_kv_write")

DEVICE = "cpu" if attention_kernel.INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA and the kernels were not built for the interpreter", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("single_thread")

RMS_TOL = dict(atol=1e-6, rtol=1e-6)
SWIGLU_TOL = dict(atol=1e-6, rtol=1e-6)
ATTENTION_TOL = dict(atol=2e-6, rtol=2e-6)
FP16_ONE_ULP = dict(atol=1e-3, rtol=2 ** -10)  # one fp16 rounding step apart at most


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def ulps_apart(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| in units of the last place of `want` (fp32)."""
    spacing = torch.nextafter(want.abs(), torch.tensor(float("inf"), device=want.device)) - want.abs()
    return ((got - want).abs() / spacing).max().item()


def both(op, *args, **kwargs):
    """(reference result, kernel result) of a block_ops entry point."""
    return op(*args, **kwargs, backend="torch"), op(*args, **kwargs, backend="triton")


# ---------------------------------------------------------------------- add + RMSNorm

@pytest.mark.parametrize("shape", [(1, 100), (3, 5, 37), (5, 1, 768)], ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
def test_add_rmsnorm_kernel_matches_reference_fp32(shape, with_residual):
    x, w = randn(*shape, seed=1, scale=3.0), randn(shape[-1], seed=2)
    residual = randn(*shape, seed=3) if with_residual else None
    (ref_normed, ref_h), (normed, h) = both(block_ops.add_rmsnorm, x, residual, w, 1e-5)
    assert torch.equal(h, ref_h) and normed.shape == shape and normed.dtype == torch.float32
    torch.testing.assert_close(normed, ref_normed, **RMS_TOL)
    assert ulps_apart(normed, ref_normed) <= 4.0  # see the module doc
    if not with_residual:
        assert h is x  # no copy when there is nothing to add


def test_add_rmsnorm_kernel_fp16_rounds_like_torch():
    x, residual = (randn(3, 5, 100, seed=s, dtype=torch.float16) for s in (4, 5))
    w = randn(100, seed=6, dtype=torch.float16)
    (ref_normed, ref_h), (normed, h) = both(block_ops.add_rmsnorm, x, residual, w, 1e-5)
    assert torch.equal(h, ref_h) and normed.dtype == torch.float16
    torch.testing.assert_close(normed, ref_normed, **FP16_ONE_ULP)
    # Almost all bit-identical: only a last-ulp difference of the fp32 mean can flip an fp16 rounding. Scaling
    # before the cast to fp16 (the wrong order) leaves about a quarter of the values one ulp off.
    assert (normed == ref_normed).float().mean() > 0.99


def test_add_rmsnorm_kernel_promotes_like_torch_for_fp32_weight():
    x = randn(2, 40, seed=7, dtype=torch.float16)
    w = randn(40, seed=8)  # an fp32 weight on fp16 activations: torch promotes the product to fp32
    (ref_normed, _), (normed, _) = both(block_ops.add_rmsnorm, x, None, w, 1e-5)
    assert normed.dtype == ref_normed.dtype == torch.float32
    torch.testing.assert_close(normed, ref_normed, **FP16_ONE_ULP)


# ---------------------------------------------------------------------- RoPE + KV write

def nan_cache(rows_total, H, S, D, dtype=torch.float32):
    return (torch.full((rows_total, H, S, D), float("nan"), dtype=dtype, device=DEVICE),
            torch.full((rows_total, H, S, D), float("nan"), dtype=dtype, device=DEVICE))


ROPE_CASES = [  # (R, L, H, D, S, row_start, positions)
    (1, 1, 1, 8, 37, 0, [0]),
    (3, 1, 3, 100, 37, 2, [36]),
    (5, 1, 3, 64, 37, 1, [18]),
    (3, 3, 1, 100, 37, 0, [5, 36, 0]),   # prefill-style: several positions, not contiguous
]


@pytest.mark.parametrize("R, L, H, D, S, row_start, positions", ROPE_CASES, ids=str)
def test_rope_kv_write_kernel_is_bit_exact_and_touches_nothing_else(R, L, H, D, S, row_start, positions):
    qkv = randn(R, L, 3 * H * D, seed=R + D)
    rope = randn(S + 4, D // 2, 2, seed=9)  # arbitrary (cos, sin) values: every pair entry matters
    pos = torch.tensor(positions, device=DEVICE)
    rows_total = row_start + R + 1
    ref_k, ref_v = nan_cache(rows_total, H, S, D)
    k, v = nan_cache(rows_total, H, S, D)
    ref_q = block_ops.rope_kv_write(qkv, rope, pos, ref_k, ref_v, row_start, backend="torch")
    q = block_ops.rope_kv_write(qkv, rope, pos, k, v, row_start, backend="triton")
    assert q.shape == (R, H, L, D) and q.is_contiguous()
    assert torch.equal(q, ref_q)
    for got, want in ((k, ref_k), (v, ref_v)):
        assert torch.equal(got.nan_to_num(123.0), want.nan_to_num(123.0))
        written = torch.zeros(rows_total, S, dtype=torch.bool, device=DEVICE)
        written[row_start:row_start + R, positions] = True
        assert torch.isnan(got.permute(0, 2, 1, 3)[~written]).all()  # other rows / positions: still NaN
        assert not torch.isnan(got.permute(0, 2, 1, 3)[written]).any()


def test_rope_kv_write_kernel_fp16_is_bit_exact():
    R, L, H, D, S = 3, 2, 3, 100, 20
    qkv = randn(R, L, 3 * H * D, seed=11, dtype=torch.float16)
    rope = randn(S, D // 2, 2, seed=12)
    pos = torch.tensor([7, 19], device=DEVICE)
    caches = [torch.zeros(R, H, S, D, dtype=torch.float16, device=DEVICE) for _ in range(4)]
    ref_q = block_ops.rope_kv_write(qkv, rope, pos, caches[0], caches[1], 0, backend="torch")
    q = block_ops.rope_kv_write(qkv, rope, pos, caches[2], caches[3], 0, backend="triton")
    assert torch.equal(q, ref_q) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_rope_kv_write_kernel_with_llamagen_table_zeroes_prefix_positions():
    # LlamaGen's table has cls_token_num rows of zeros: q and k at condition positions are zero vectors.
    H, D, T = 2, 8, 3
    table = rope_table_2d(grid_size=4, head_dim=D, cls_token_num=T).to(DEVICE)
    qkv = randn(2, 2, 3 * H * D, seed=13)
    pos = torch.tensor([1, T + 5], device=DEVICE)
    k, v = nan_cache(2, H, T + 16, D)
    q = block_ops.rope_kv_write(qkv, table, pos, k, v, 0, backend="triton")
    assert (q[:, :, 0] == 0).all() and (k[:, :, 1] == 0).all() and (q[:, :, 1] != 0).any()
    assert torch.equal(v[:, :, 1], qkv[:, 0, 2 * H * D:].view(2, H, D))  # v is written raw


def test_rope_kv_write_kernel_skips_positions_outside_the_cache():
    H, D, S = 2, 8, 10
    qkv = randn(1, 1, 3 * H * D, seed=14)
    k, v = nan_cache(1, H, S, D)
    for bad in (S, S + 7, -1):
        block_ops.rope_kv_write(qkv, randn(S + 10, D // 2, 2), torch.tensor([bad], device=DEVICE), k, v, 0,
                                backend="triton")
    assert torch.isnan(k).all() and torch.isnan(v).all()


# ---------------------------------------------------------------------- SwiGLU

@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(100) = inf in fp32, as intended
@pytest.mark.parametrize("shape", [(1, 2), (1, 200), (3, 5, 74), (7, 2000)], ids=str)
def test_swiglu_kernel_matches_reference_fp32(shape):
    gate_up = randn(*shape, seed=shape[-1], scale=4.0)
    gate_up.view(-1)[:4] = torch.tensor([100.0, -100.0, 0.0, -0.0])[:gate_up.numel()]  # exp overflow, zeros
    ref, out = both(block_ops.swiglu, gate_up)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == gate_up.dtype
    torch.testing.assert_close(out, ref, **SWIGLU_TOL)


def test_swiglu_kernel_fp16_rounds_like_torch():
    ref, out = both(block_ops.swiglu, randn(6, 3, 90, seed=15, scale=3.0, dtype=torch.float16))
    torch.testing.assert_close(out, ref, **FP16_ONE_ULP)
    assert (out == ref).float().mean() > 0.99  # almost all bit-identical: only exp's last-ulp differences flip


# ---------------------------------------------------------------------- decode attention

def attention_inputs(R, H, D, S, row_start, seed, prefix=0):
    rows_total = row_start + R + 2
    q = randn(R, H, 1, D, seed=seed, scale=2.0)
    cache_k = randn(rows_total, H, S, D, seed=seed + 1)
    cache_v = randn(rows_total, H, S, D, seed=seed + 2, scale=3.0)
    key_valid = torch.ones(rows_total, S, dtype=torch.bool, device=DEVICE)
    if prefix:
        g = torch.Generator().manual_seed(seed + 3)
        key_valid[:, :prefix] = torch.rand(rows_total, prefix, generator=g).to(DEVICE) > 0.5
        key_valid[row_start, :prefix] = False  # a row whose whole prefix is masked
    return q, cache_k, cache_v, key_valid


ATTENTION_CASES = [  # (R, H, D, S, row_start, position, prefix of masked keys or 0 = key_valid None)
    (1, 1, 8, 37, 0, 0, 0),
    (1, 3, 64, 37, 0, 36, 0),
    (3, 1, 100, 75, 2, 40, 6),
    (5, 3, 64, 130, 1, 129, 12),
    (3, 3, 100, 37, 0, 3, 4),   # position inside the masked prefix: the diagonal stays visible
]


@pytest.mark.parametrize("R, H, D, S, row_start, position, prefix", ATTENTION_CASES, ids=str)
@pytest.mark.parametrize("num_splits", [None, 3, 7])
def test_decode_attention_kernel_matches_reference_and_ignores_unread_keys(R, H, D, S, row_start, position,
                                                                          prefix, num_splits):
    q, cache_k, cache_v, key_valid = attention_inputs(R, H, D, S, row_start, seed=R * 10 + D, prefix=prefix)
    key_valid = key_valid if prefix else None
    pos = torch.tensor([position], device=DEVICE)
    ref = block_ops.decode_attention(q, cache_k, cache_v, row_start, pos, key_valid, position + 1, backend="torch")
    # Poison every key the result must not depend on: beyond `position`, and masked prefix keys.
    unread = torch.arange(S, device=DEVICE) > position
    unread = unread | (~key_valid & (torch.arange(S, device=DEVICE) != position)) if prefix else unread
    unread = unread.expand(cache_k.shape[0], S)
    poisoned_k, poisoned_v = cache_k.clone(), cache_v.clone()
    poisoned_k.permute(0, 2, 1, 3)[unread] = float("nan")
    poisoned_v.permute(0, 2, 1, 3)[unread] = float("nan")
    for max_end in sorted({position + 1, S}):
        out = attention_kernel.decode_attention_triton(q, poisoned_k, poisoned_v, row_start, pos, key_valid, max_end,
                                                       num_splits=num_splits)
        assert out.shape == (R, H, 1, D) and out.dtype == q.dtype
        torch.testing.assert_close(out, ref, **ATTENTION_TOL)


def test_decode_attention_entry_point_and_max_end_give_the_same_output():
    R, H, D, S, position = 3, 3, 64, 130, 70
    q, cache_k, cache_v, key_valid = attention_inputs(R, H, D, S, 0, seed=21, prefix=5)
    pos = torch.tensor([position], device=DEVICE)
    outs = [block_ops.decode_attention(q, cache_k, cache_v, 0, pos, key_valid, end, backend=backend)
            for backend in ("torch", "triton") for end in (position + 1, 128, S)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], **ATTENTION_TOL)
    assert torch.equal(outs[3], outs[4]) and torch.equal(outs[3], outs[5])  # the kernel ignores max_end


def test_decode_attention_kernel_fp16():
    q, cache_k, cache_v, key_valid = attention_inputs(2, 3, 100, 50, 1, seed=31, prefix=4)
    q, cache_k, cache_v = (t.half() for t in (q, cache_k, cache_v))
    pos = torch.tensor([33], device=DEVICE)
    ref = block_ops.decode_attention_reference(q.float(), cache_k.float(), cache_v.float(), 1, pos, key_valid, 50)
    out = attention_kernel.decode_attention_triton(q, cache_k, cache_v, 1, pos, key_valid, 50, num_splits=3)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, **FP16_ONE_ULP)


def test_decode_attention_split_count_fills_an_h100_and_never_depends_on_position():
    # Issue 21 replaced the rule (>= 2 programs per SM, splits of >= one 64-key block) by num_kv_splits (FA3's
    # fill threshold, FlashInfer's chunks of >= 128 keys); its table is in tests/test_fused_decode_kernels.py.
    splits = attention_kernel.launch_config
    assert splits(2, 12, 1144, 64, on_gpu=True, sm_count=132)[0] == 9  # GPT-B batch 1 CFG: 24 programs x 9
    assert splits(128, 20, 1144, 64, on_gpu=True, sm_count=132)[0] == 1  # enough (row, head) programs already
    assert splits(1, 12, 100, 64, on_gpu=True, sm_count=132)[0] == 1  # fewer keys than one 128-key chunk
    assert splits(1, 12, 100, 64, on_gpu=False)[0] == 1


# ---------------------------------------------------------------------- references == LlamaGen's math
# Frozen copies of LlamaGen's formulas (autoregressive/models/gpt.py), written independently of block_ops, so the
# references the model now runs are checked against the original, not against themselves.

def llamagen_rmsnorm(x, weight, eps):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def llamagen_rotary(x, freqs_cis):  # x [R, L, H, D], freqs_cis [L, D/2, 2]
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
                       xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


def llamagen_mask(S, positions, prefix_valid=None):
    """LlamaGen's causal_mask[:, None, input_pos] (+ t2i: padded prefix keys hidden, diagonal kept)."""
    mask = torch.tril(torch.ones(S, S, dtype=torch.bool))[None]
    if prefix_valid is not None:
        T = prefix_valid.shape[1]
        mask = mask.repeat(prefix_valid.shape[0], 1, 1)
        mask[:, :, :T] &= prefix_valid[:, None, :]
        mask |= torch.eye(S, dtype=torch.bool)[None]
    return mask[:, None, positions]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_add_rmsnorm_reference_is_llamagen_rmsnorm(dtype):
    weight = torch.randn(96).to(dtype)
    x, residual = torch.randn(3, 4, 96).to(dtype), torch.randn(3, 4, 96).to(dtype)
    normed, h = block_ops.add_rmsnorm_reference(x, residual, weight, 1e-5)
    assert torch.equal(h, x + residual) and torch.equal(normed, llamagen_rmsnorm(x + residual, weight, 1e-5))
    assert torch.equal(block_ops.add_rmsnorm_reference(x, None, weight, 1e-5)[0], llamagen_rmsnorm(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_kv_write_reference_is_llamagen_rotary_and_cache_write(dtype):
    gpt = tiny_gpt("t2i")
    c = gpt.config
    H, D, R, S = c.n_head, c.head_dim, 3, c.max_seq_len
    positions = torch.tensor([2, c.cls_token_num, S - 1])  # a prefix row (zeros), the first image token, last
    qkv = torch.randn(R, len(positions), 3 * c.dim).to(dtype)
    cache_k, cache_v = torch.zeros(R + 1, H, S, D, dtype=dtype), torch.zeros(R + 1, H, S, D, dtype=dtype)
    q = block_ops.rope_kv_write_reference(qkv, gpt.rope, positions, cache_k, cache_v, 1)
    rope = gpt.rope[positions].float()
    want_q, want_k, want_v = qkv.split(c.dim, dim=-1)
    want_q = llamagen_rotary(want_q.view(R, -1, H, D), rope).transpose(1, 2)
    want_k = llamagen_rotary(want_k.view(R, -1, H, D), rope).transpose(1, 2)
    assert torch.equal(q, want_q)
    assert torch.equal(cache_k[1:, :, positions], want_k)
    assert torch.equal(cache_v[1:, :, positions], want_v.view(R, -1, H, D).transpose(1, 2))
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[positions] = False
    for cache in (cache_k, cache_v):
        assert (cache[0] == 0).all() and (cache[:, :, untouched] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swiglu_reference_is_llamagen_feed_forward(dtype):
    ff = FeedForward(tiny_gpt_config()).to(dtype)
    w1, w3 = ff.w13.split(ff.hidden_dim)
    x = torch.randn(3, 2, w1.shape[1]).to(dtype)
    want = ff.w2(F.silu(F.linear(x, w1)) * F.linear(x, w3))  # LlamaGen: w2(silu(w1 x) * w3 x)
    gate_up = torch.cat([F.linear(x, w1), F.linear(x, w3)], dim=-1)
    assert torch.equal(ff.w2(block_ops.swiglu_reference(gate_up)), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_attention_reference_is_sdpa_with_llamagen_masks(dtype):
    gpt = tiny_gpt("t2i")
    T, S, R, H, D = gpt.config.cls_token_num, gpt.config.max_seq_len, 4, gpt.config.n_head, gpt.config.head_dim
    q, cache_k, cache_v = (torch.randn(*shape).to(dtype) for shape in ((R, H, 1, D), (R, H, S, D), (R, H, S, D)))
    prefix_valid = torch.rand(R, T) > 0.4
    key_valid = torch.ones(R, S, dtype=torch.bool)
    key_valid[:, :T] = prefix_valid
    for position in (T, T + 9, S - 1):
        pos = torch.tensor([position])
        bucket = min(S, (position // 8 + 1) * 8)
        for valid, prefix in ((None, None), (key_valid, prefix_valid)):
            # LlamaGen reads the whole cache with its mask row; the reference reads [:end] for any end > position
            mask = llamagen_mask(S, pos, prefix)
            want = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask)
            for end in (position + 1, bucket, S):
                got = block_ops.decode_attention_reference(q, cache_k, cache_v, 0, pos, valid, end)
                torch.testing.assert_close(got, want, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)


# ---------------------------------------------------------------------- one decode step composed of the ops

def decode_step_with_block_ops(gpt, cache, tokens, position: int, backend: str, fused_w13: bool):
    """The block's decode step written out as the four ops + F.linear: tokens [R] fed at `position` -> final
    normed hidden [R, 1, d]; K/V written into cache rows 0..R-1."""
    R, d = tokens.shape[0], gpt.config.dim
    eps = gpt.config.norm_eps
    pos = torch.tensor([position], device=tokens.device)
    x, residual = gpt.embed_tokens(tokens)[:, None], None
    for layer, cache_k, cache_v in zip(gpt.layers, cache.k, cache.v):
        normed, h = block_ops.add_rmsnorm(x, residual, layer.attention_norm.weight, eps, backend=backend)
        qkv = F.linear(normed, layer.attention.wqkv.weight)
        q = block_ops.rope_kv_write(qkv, gpt.rope, pos, cache_k, cache_v, 0, backend=backend)
        attn = block_ops.decode_attention(q, cache_k, cache_v, 0, pos, cache.key_valid, position + 1,
                                          backend=backend)
        out = F.linear(attn.transpose(1, 2).reshape(R, 1, d), layer.attention.wo.weight)
        normed, h = block_ops.add_rmsnorm(out, h, layer.ffn_norm.weight, eps, backend=backend)
        ff = layer.feed_forward
        if fused_w13:  # one GEMM against [w1; w3]
            gate_up = F.linear(normed, ff.w13)
        else:
            gate_up = torch.cat([F.linear(normed, w) for w in ff.w13.split(ff.hidden_dim)], dim=-1)
        x, residual = F.linear(block_ops.swiglu(gate_up, backend=backend), ff.w2.weight), h
    return block_ops.add_rmsnorm(x, residual, gpt.norm.weight, eps, backend=backend)[0]


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_decode_step_from_block_ops_is_the_models_decode_step(model_type):
    from tiny_models import captions

    gpt = tiny_gpt(model_type).to(DEVICE)
    c = gpt.config
    B, T = 3, c.cls_token_num
    cache = gpt.new_cache(B)
    if model_type == "t2i":
        feats, prefix_valid = captions(gpt, B, [T, 2, 0])
        cond = feats.to(DEVICE)
        cache.set_prefix_mask(prefix_valid.to(DEVICE))
    else:
        cond = torch.tensor([1, 4, 7], device=DEVICE)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(c.vocab_size, (B, 3), generator=g).to(DEVICE)
    with torch.no_grad():
        gpt.forward_hidden(torch.cat([gpt.condition_embeddings(cond), gpt.embed_tokens(tokens[:, :2])], 1), cache)
        position = T + 2
        filled = [(k.clone(), v.clone()) for k, v in zip(cache.k, cache.v)]
        want = gpt.forward_hidden(gpt.embed_tokens(tokens[:, 2:]), cache, start=position)
        want_cache = [(k.clone(), v.clone()) for k, v in zip(cache.k, cache.v)]
        results = {}
        for backend, fused_w13 in (("torch", False), ("triton", True)):
            for ck, cv, (k, v) in zip(cache.k, cache.v, filled):
                ck.copy_(k)
                cv.copy_(v)
            results[backend] = decode_step_with_block_ops(gpt, cache, tokens[:, 2], position, backend, fused_w13)
            for ck, cv, (k, v) in zip(cache.k, cache.v, want_cache):
                torch.testing.assert_close(ck, k, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(cv, v, atol=1e-5, rtol=1e-5)
        # the model's own decode step at a device position, through the dispatching ops
        for ck, cv, (k, v) in zip(cache.k, cache.v, filled):
            ck.copy_(k)
            cv.copy_(v)
        fused = gpt.forward_hidden(gpt.embed_tokens(tokens[:, 2:]), cache, position=torch.tensor([position]),
                                   max_end=c.max_seq_len, backend="triton")
    # w1 | w3 as two GEMMs (the references) vs one [w1; w3] GEMM: the same dot products, bit for bit on CPU
    torch.testing.assert_close(results["torch"], want, atol=1e-6, rtol=1e-6)
    # Triton + the [w1; w3] GEMM: every op's rounding differences, carried through 2 layers
    torch.testing.assert_close(results["triton"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- dispatch

def test_dispatch_env_forces_torch_and_interpreted_triton_runs_on_cpu(monkeypatch):
    x, w = randn(2, 30, seed=41), randn(30, seed=42)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.select_backend(torch.device(DEVICE)) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    backend = dispatch.select_backend(torch.device(DEVICE))
    assert backend == "triton"
    normed, _ = block_ops.add_rmsnorm(x, None, w, 1e-5, backend=backend)
    torch.testing.assert_close(normed, block_ops.add_rmsnorm_reference(x, None, w, 1e-5)[0], **RMS_TOL)


def test_dispatch_auto_on_cpu_picks_torch(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert dispatch.select_backend(torch.device("cpu")) == "torch"


def test_dispatch_covers_every_kernel_module(monkeypatch):
    assert dispatch.triton_unavailable_reason(torch.device(DEVICE)) is None
    import llamagen_core2.kernels.swiglu as swiglu_kernel

    monkeypatch.setattr(swiglu_kernel, "INTERPRETED", not swiglu_kernel.INTERPRETED)
    reason = dispatch.triton_unavailable_reason(torch.device(DEVICE))
    assert reason is not None and "different targets" in reason and "swiglu" in reason
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(dispatch.KernelUnavailable, match="LLAMAGEN_CORE2_KERNELS=triton but"):
        dispatch.select_backend(torch.device(DEVICE))


# ---------------------------------------------------------------------- argument checks

def test_bad_arguments_raise_invalid_argument_on_both_backends():
    qkv, rope = randn(2, 1, 3 * 2 * 8), randn(10, 4, 2)
    cache = torch.zeros(3, 2, 10, 8, device=DEVICE)
    pos = torch.tensor([4], device=DEVICE)
    q = randn(2, 2, 1, 8)
    cases = [
        (block_ops.add_rmsnorm, (randn(2, 8), randn(2, 7), randn(8), 1e-5), "residual must match x"),
        (block_ops.add_rmsnorm, (randn(2, 8), None, randn(7), 1e-5), r"weight must be \[8\]"),
        (block_ops.add_rmsnorm, (randn(2, 8), None, randn(8), 0.0), "eps must be a finite number > 0"),
        (block_ops.rope_kv_write, (randn(2, 1, 47), rope, pos, cache, cache, 0), r"qkv must be \[R, L, 3\*H\*D\]"),
        (block_ops.rope_kv_write, (qkv, rope, pos.float(), cache, cache, 0), r"positions must be an int64 tensor"),
        (block_ops.rope_kv_write, (qkv, rope, pos, cache, cache, 2), r"row_start must be an int in \[0, 1\]"),
        (block_ops.rope_kv_write, (qkv, randn(10, 3, 2), pos, cache, cache, 0), r"rope must be a \(cos, sin\)"),
        (block_ops.rope_kv_write, (qkv, rope, pos, cache.double(), cache.double(), 0), "cache_k must have the dtype"),
        (block_ops.swiglu, (randn(3, 7),), "even, non-zero last dimension"),
        (block_ops.decode_attention, (randn(2, 2, 2, 8), cache, cache, 0, pos, None, 10), r"q must be \[R, H, 1, D\]"),
        (block_ops.decode_attention, (q, cache, cache, 0, pos, torch.ones(3, 9, dtype=torch.bool), 10),
         r"key_valid must be None or a bool tensor \[3, 10\]"),
        (block_ops.decode_attention, (q, cache, cache, 0, pos, None, 11), r"max_end must be an int in \[1, 10\]"),
        (block_ops.decode_attention, (q, cache, cache, 0, torch.tensor([1, 2]), None, 10), r"position must be"),
    ]
    for op, args, match in cases:
        for backend in ("torch", "triton"):
            with pytest.raises(InvalidArgument, match=match):
                op(*args, backend=backend)
    with pytest.raises(InvalidArgument, match="backend must be one of"):
        block_ops.swiglu(randn(3, 8), backend="cuda")


# ---------------------------------------------------------------------- GPU compile smoke test (no GPU needed)

AOT_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
if "nvidia" not in triton.backends.backends:
    sys.exit(77)
from llamagen_core2.kernels import add_rmsnorm, decode_attention, rope_kv_write, swiglu

MODELS = {"GPT-B": (768, 12, 64, 2048), "GPT-XL": (1280, 20, 64, 3584), "GPT-3B": (3200, 32, 100, 8704)}
ROWS, MAX_LEN, SM_COUNT = (1, 128), 577, 132  # 384 px c2i cache; an H100's SMs
TARGET = GPUTarget("cuda", 90, 32)
built = set()


def build(fn, types, consts, num_warps, **options):
    sig = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
    key = (fn.__name__, tuple(sig.items()), tuple(consts.items()), num_warps)
    if key not in built:
        kernel = triton.compile(ASTSource(fn, sig, constexprs=consts), target=TARGET,
                                options={"num_warps": num_warps, **options})
        assert len(kernel.asm["cubin"]) > 0
        built.add(key)


for dtype in ("fp32", "bf16", "fp16"):
    act = "*" + dtype
    for dim, heads, head_dim, ffn in MODELS.values():
        for rows in ROWS:
            block_d, warps = add_rmsnorm.launch_config(dim)
            for residual in (True, False):
                build(add_rmsnorm._add_rmsnorm_kernel,
                      {"x_ptr": act, "residual_ptr": act, "weight_ptr": act, "normed_ptr": act, "h_ptr": act,
                       "eps": "fp32"},
                      {"HAS_RESIDUAL": residual, "BLOCK_D": block_d}, warps)
            block_h, block_half, warps = rope_kv_write.launch_config(rows, 1, heads, head_dim, True, SM_COUNT)
            build(rope_kv_write._rope_kv_write_kernel,
                  {"qkv_ptr": act, "rope_ptr": "*fp32", "positions_ptr": "*i64", "cache_k_ptr": act,
                   "cache_v_ptr": act, "q_out_ptr": act},
                  {"BLOCK_H": block_h, "BLOCK_HALF": block_half}, warps, enable_fp_fusion=False)
            block_f, warps = swiglu.launch_config(rows, ffn, True, SM_COUNT)
            build(swiglu._swiglu_kernel, {"gate_up_ptr": act, "out_ptr": act},
                  {"LIBDEVICE_EXP": True, "BLOCK_F": block_f}, warps)
            splits, block_n, block_d, warps = decode_attention.launch_config(rows, heads, MAX_LEN, head_dim, True,
                                                                             SM_COUNT)
            parts = {"part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32"}
            for masked in (True, False):
                build(decode_attention._decode_attention_split_kernel,
                      {"q_ptr": act, "cache_k_ptr": act, "cache_v_ptr": act, "key_valid_ptr": "*u8",
                       "position_ptr": "*i64", "out_ptr": act, "qk_scale": "fp32", **parts},
                      {"HAS_KEY_VALID": masked, "NUM_SPLITS": splits, "BLOCK_N": block_n, "BLOCK_D": block_d}, warps)
            if splits > 1:
                block_splits, warps = decode_attention.combine_launch_config(splits, block_d)
                build(decode_attention._decode_attention_combine_kernel, {"out_ptr": act, **parts},
                      {"NUM_SPLITS": splits, "BLOCK_SPLITS": block_splits, "BLOCK_D": block_d}, warps)
names = sorted({key[0] for key in built})
print("compiled", len(built), "specialisations of", " ".join(names))
"""


@pytest.mark.slow
def test_every_block_kernel_compiles_for_sm90_with_the_launch_configs():
    """Lowers every kernel through ptxas for an H100 (sm_90a) in fp32, bf16 and fp16 with the launch configs of
    GPT-B, GPT-XL and GPT-3B (head_dim 100) at 1 and 128 rows, without a GPU: catches type and layout errors
    that the interpreter (numpy broadcasting, fp32 only) lets through."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the fused sampler's default; rope disables it per launch
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode == 77:
        pytest.skip("triton has no nvidia backend here")
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = ("_add_rmsnorm_kernel _decode_attention_combine_kernel _decode_attention_split_kernel "
               "_rope_kv_write_kernel _swiglu_kernel")
    assert f"of {kernels}" in done.stdout, done.stdout
