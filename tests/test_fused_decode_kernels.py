"""The decode layer's fused kernels (issue 21, phase 1): skinny split-K GEMM, add+RMSNorm+wqkv+RoPE+KV write,
add+RMSNorm+[w1;w3]+SwiGLU, and the decode-attention split rule, against their torch references.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), in fp32, on small odd shapes (M in {1, 3, 17}, N and K not
multiples of the blocks, H*D = 30 with 45 rotation pairs) with explicit configs that force several row / column
tiles and split-K (the interpreter's own configs never split). bf16/fp16 are covered by the sm_90a compile test
at the issue's shapes (benchmarks/kernel_resources.py --block) and by a GPU run (benchmarks/bench_block_kernels.py).
Tolerances (fp32, inputs scaled so outputs are O(1)), and why:
  * h (the new residual) bit-exact: the same single rounding of x + residual as add_rmsnorm;
  * GEMM outputs, q, cache K/V, SwiGLU: atol = rtol = 1e-5. The sums run in tiles (and over split partials,
    in split order) instead of torch's order, and the RMSNorm scale is applied to the fp32 accumulator (one
    rounding of the normalised activations instead of two): a few fp32 ulps per output for K <= 200. Measured
    on these cases (2026-12-04, CPU interpreter): max |diff| / max(|reference|, 1) <= 2.0e-6 (GEMM 8.1e-7,
    q and K/V 6.6e-7, SwiGLU 2.0e-6 on outputs up to ~10).
"""
from collections import Counter

import pytest
import torch

from llamagen_core2.decode import block_ops, op_checks
from llamagen_core2.errors import InvalidArgument
from tiny_models import captions, tiny_gpt

gemm = pytest.importorskip("llamagen_core2.kernels.skinny_gemm")
qkv_kernel = pytest.importorskip("llamagen_core2.kernels.norm_qkv_rope")
w13_kernel = pytest.importorskip("llamagen_core2.kernels.norm_w13_swiglu")
attention_kernel = pytest.importorskip("llamagen_core2.kernels.decode_attention")

DEVICE = "cpu" if gemm.INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA and the kernels were not built for the interpreter", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = dict(atol=1e-5, rtol=1e-5)
Config = gemm.GemmConfig


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE)


def assert_counters_reset(workspace):
    """The last program of every tile left its counter at 0: the workspace is ready for the next call."""
    assert workspace.counters is None or not workspace.counters.any()


# ---------------------------------------------------------------------- skinny GEMM

GEMM_CASES = [  # (x shape, N, config or None = the launcher's own)
    ((1, 50), 37, None),
    ((3, 1, 200), 70, Config(16, 16, 16, 3, 4, 1)),    # split-K 3 over 13 K blocks, 5 column tiles
    ((17, 130), 45, Config(16, 32, 32, 5, 4, 1)),      # two row tiles, K blocks 5 -> 5 splits
    ((17, 130), 45, Config(32, 16, 64, 4, 4, 1)),      # 3 K blocks asked to split 4 ways -> 3 non-empty splits
]


@pytest.mark.parametrize("shape, N, config", GEMM_CASES, ids=str)
def test_skinny_linear_matches_f_linear(shape, N, config):
    K = shape[-1]
    x, weight = randn(*shape, seed=K), randn(N, K, seed=N, scale=K ** -0.5)
    workspace = gemm.SplitKWorkspace()
    out = gemm.skinny_linear_triton(x, weight, workspace=workspace, config=config)
    assert out.shape == (*shape[:-1], N) and out.dtype == x.dtype
    torch.testing.assert_close(out, block_ops.skinny_linear_reference(x, weight), **TOL)
    assert_counters_reset(workspace)


def test_one_workspace_serves_successive_split_gemms_of_other_shapes():
    """The counters reset themselves, so a second call (another shape, fewer tiles) on the same workspace is
    correct without a memset; the buffers are reused while they are large enough (stable addresses)."""
    workspace = gemm.SplitKWorkspace()
    for M, N, K, split in ((17, 45, 130, 4), (3, 37, 90, 2), (17, 45, 130, 3)):
        x, weight = randn(M, K, seed=M + K), randn(N, K, seed=N, scale=K ** -0.5)
        out = gemm.skinny_linear_triton(x, weight, workspace=workspace, config=Config(16, 16, 32, split, 4, 1))
        torch.testing.assert_close(out, x @ weight.T, **TOL)
        assert_counters_reset(workspace)
        if M == 3:
            addresses = workspace.partials.data_ptr(), workspace.counters.data_ptr()
    assert (workspace.partials.data_ptr(), workspace.counters.data_ptr()) == addresses


def test_gemm_config_fills_the_sms_and_never_leaves_a_split_empty():
    config = gemm.gemm_config
    # GPT-XL b8 CFG out projection: 40 column tiles of 32 on an H100 -> K split 4 ways (160 programs)
    assert config(16, 1280, 1280, True, 132) == Config(16, 32, 128, 4, 4, 4)
    # GPT-XL b64 CFG fused wqkv (1920 rotation pairs, 2 weight rows each): 60 tiles of 32 pairs, 3 splits, 8 warps
    assert config(128, 1920, 1280, True, 132, weight_rows_per_unit=2) == Config(128, 32, 64, 3, 8, 4)
    # enough column tiles already (GPT-3B w13 at 16 rows: 272 tiles): no split
    assert config(16, 8704, 3200, True, 132, weight_rows_per_unit=2).split_k == 1
    # short K: at most K / (2 BLOCK_K) splits
    assert config(1, 64, 256, True, 132).split_k == 1
    assert config(3, 40, 50, False).split_k == 1  # the interpreter never splits
    for rows, units, K in ((1, 768, 768), (2, 1152, 768), (16, 3584, 1280), (128, 1280, 3584), (5, 45, 1000)):
        c = config(rows, units, K, True, 132)
        splits, k_per_split = gemm.split_layout(K, c.block_k, c.split_k)
        assert splits == c.split_k and (splits - 1) * k_per_split < K <= splits * k_per_split
        assert c.block_m >= rows and k_per_split % c.block_k == 0



def test_gemm_config_only_makes_configs_the_launchers_accept():
    """plan_launch checks a caller's config, not gemm_config's own: so every config gemm_config makes must pass."""
    for on_gpu in (True, False):
        for rows in (1, 2, 3, 8, 16, 33, 64, 128):
            for units, K in ((40, 50), (768, 768), (1280, 1280), (1920, 1280), (5120, 1280), (8704, 3200)):
                for weight_rows, size in ((1, 2), (2, 2), (1, 4), (2, 4)):
                    c = gemm.gemm_config(rows, units, K, on_gpu, 132, weight_rows_per_unit=weight_rows,
                                         element_size=size)
                    assert gemm.check_config(c) == c


# ---------------------------------------------------------------------- add + RMSNorm + wqkv + RoPE + KV write

def rope_with_prefix(S, D, prefix, seed):
    """Arbitrary (cos, sin) rows, with LlamaGen's zero rows at the `prefix` condition positions."""
    rope = randn(S + 3, D // 2, 2, seed=seed)
    rope[:prefix] = 0
    return rope


QKV_CASES = [  # (R, L, H, D, d, S, positions, row_start, residual, config)
    (1, 1, 3, 10, 37, 20, [0], 0, True, None),                            # position 0: a zero RoPE row
    (3, 1, 3, 10, 37, 20, [19], 1, True, Config(16, 16, 16, 3, 4, 1)),    # the cache end; 45 pairs, 3 tiles, split 3
    (17, 1, 1, 6, 50, 20, [7], 0, False, Config(16, 16, 16, 2, 4, 1)),    # M = 17: two row tiles; no residual
    (2, 3, 2, 8, 40, 20, [3, 1, 19], 2, True, Config(16, 16, 32, 2, 4, 1)),  # a window of 3 positions per row
]


@pytest.mark.parametrize("R, L, H, D, d, S, positions, row_start, residual, config", QKV_CASES, ids=str)
def test_norm_qkv_rope_matches_the_composed_reference(R, L, H, D, d, S, positions, row_start, residual, config):
    x = randn(R, L, d, seed=d, scale=2.0)
    res = randn(R, L, d, seed=d + 1) if residual else None
    norm_weight, wqkv = randn(d, seed=3), randn(3 * H * D, d, seed=4, scale=d ** -0.5)
    rope = rope_with_prefix(S, D, prefix=2, seed=5)
    pos = torch.tensor(positions, device=DEVICE)
    rows_total = row_start + R + 1
    caches = [torch.full((rows_total, H, S, D), float("nan"), device=DEVICE) for _ in range(4)]
    ref_q, ref_h = block_ops.norm_qkv_rope_reference(x, res, norm_weight, 1e-5, wqkv, rope, pos, caches[0],
                                                     caches[1], row_start)
    workspace = gemm.SplitKWorkspace()
    q, h = qkv_kernel.norm_qkv_rope_triton(x, res, norm_weight, 1e-5, wqkv, rope, pos, caches[2], caches[3],
                                           row_start, workspace=workspace, config=config)
    assert q.shape == (R, H, L, D) and q.is_contiguous()
    torch.testing.assert_close(q, ref_q, **TOL)
    assert torch.equal(h, ref_h) and (residual or h is x)
    if 0 in positions:  # zero rope row: q and k are zero vectors at that position
        assert (q[:, :, positions.index(0)] == 0).all()
    for got, want in ((caches[2], caches[0]), (caches[3], caches[1])):
        written = torch.zeros(rows_total, S, dtype=torch.bool, device=DEVICE)
        written[row_start:row_start + R, positions] = True
        assert torch.isnan(got.permute(0, 2, 1, 3)[~written]).all()  # other rows / positions untouched
        torch.testing.assert_close(got.permute(0, 2, 1, 3)[written], want.permute(0, 2, 1, 3)[written], **TOL)
    assert_counters_reset(workspace)


def test_norm_qkv_rope_skips_positions_outside_the_cache_or_table():
    H, D, d, S = 2, 8, 24, 10
    x, norm_weight, wqkv = randn(1, 1, d, seed=1), randn(d, seed=2), randn(3 * H * D, d, seed=3)
    k, v = (torch.full((1, H, S, D), float("nan"), device=DEVICE) for _ in range(2))
    for bad, table_rows in ((S, S + 10), (-1, S + 10), (S - 1, S - 1)):
        qkv_kernel.norm_qkv_rope_triton(x, None, norm_weight, 1e-5, wqkv, randn(table_rows, D // 2, 2),
                                        torch.tensor([bad], device=DEVICE), k, v, 0)
    assert torch.isnan(k).all() and torch.isnan(v).all()


# ---------------------------------------------------------------------- add + RMSNorm + [w1; w3] + SwiGLU

W13_CASES = [  # (x shape, F, residual, config)
    ((1, 1, 37), 45, True, None),
    ((3, 40), 70, True, Config(16, 16, 16, 3, 4, 1)),   # 5 column tiles, split 3
    ((17, 50), 33, False, Config(16, 16, 16, 2, 4, 1)),  # two row tiles, F not a multiple of the block
]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("shape, F, residual, config", W13_CASES, ids=str)
def test_norm_w13_swiglu_matches_the_composed_reference(shape, F, residual, config):
    d = shape[-1]
    x = randn(*shape, seed=d, scale=2.0)
    res = randn(*shape, seed=d + 1) if residual else None
    norm_weight, w13 = randn(d, seed=3), randn(2 * F, d, seed=4, scale=3 * d ** -0.5)
    ref_out, ref_h = block_ops.norm_w13_swiglu_reference(x, res, norm_weight, 1e-5, w13)
    workspace = gemm.SplitKWorkspace()
    out, h = w13_kernel.norm_w13_swiglu_triton(x, res, norm_weight, 1e-5, w13, workspace=workspace, config=config)
    assert out.shape == (*shape[:-1], F) and out.dtype == w13.dtype
    torch.testing.assert_close(out, ref_out, **TOL)
    assert torch.equal(h, ref_h) and (residual or h is x)
    assert_counters_reset(workspace)


# ---------------------------------------------------------------------- decode attention: the split rule

@pytest.mark.parametrize("rows, heads, filled, sms, splits", [
    (16, 20, 257, 132, 1),    # GPT-XL b8 CFG: 320 programs fill an H100 (FA3's example): one launch
    (128, 20, 1144, 132, 1),  # b64 CFG: full
    (4, 20, 257, 132, 3),     # 80 programs < 0.8 x 132: chunks of 128 keys -> 240 programs
    (2, 12, 257, 132, 3),     # GPT-B b1 CFG: 24 programs x 3 chunks of >= 128 keys
    (2, 12, 577, 132, 5),     # ... at 576 tokens
    (2, 12, 1144, 132, 9),    # ... at 1144 keys: 24 x 9 <= 2 x 132
    (1, 12, 100, 132, 1),     # fewer keys than one 128-key chunk: never split
    (1, 20, 4096, 132, 13),   # long: the smallest multiple of 64 keys that fits 264 programs: 320 -> 13
    (1, 1, 100000, 132, 64),  # capped at MAX_SPLITS
    (2, 12, 257, 16, 1),      # 24 programs >= 0.8 x 16 SMs
])
def test_num_kv_splits_table(rows, heads, filled, sms, splits):
    assert attention_kernel.num_kv_splits(rows, heads, filled, sms) == splits
    assert attention_kernel.launch_config(rows, heads, filled, 64, True, sms)[0] == splits
    assert attention_kernel.launch_config(rows, heads, filled, 64, False, sms)[0] == 1  # interpreter


def test_num_kv_splits_rules_hold_over_a_grid():
    for rows in (1, 2, 3, 8, 16, 64):
        for heads in (12, 20, 32):
            for filled in (1, 64, 128, 129, 257, 577, 1144, 4096):
                splits = attention_kernel.num_kv_splits(rows, heads, filled, 132)
                assert 1 <= splits <= attention_kernel.MAX_SPLITS
                if rows * heads >= 0.8 * 132 or filled <= 128:
                    assert splits == 1
                if splits > 1:  # the kernel's chunks (rounded up to 64 keys) hold >= 128 keys; the grid stays
                    # within 2 programs per SM unless MAX_SPLITS caps it
                    assert triton_cdiv(triton_cdiv(filled, splits), 64) * 64 >= 128
                    assert rows * heads * splits <= 2 * 132 or splits == attention_kernel.MAX_SPLITS


def triton_cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------- a whole decode step of fused launches

def fused_decode_step(gpt, cache, tokens, position: int, num_splits: int, config):
    """The tiny model's decode step as the engine runs it with every fused kernel chosen (model.run_blocks with
    decode_ops; composed here from the launchers directly): per layer norm_qkv_rope -> decode attention ->
    wo -> norm_w13_swiglu -> w2 (the W2 output is the `pending` residual of the next layer's prologue)."""
    from llamagen_core2.kernels.add_rmsnorm import add_rmsnorm_triton

    R, d, eps = tokens.shape[0], gpt.config.dim, gpt.config.norm_eps
    pos = torch.tensor([position], device=DEVICE)
    workspace = gemm.SplitKWorkspace()
    x, residual = gpt.embed_tokens(tokens)[:, None], None
    for layer, cache_k, cache_v in zip(gpt.layers, cache.k, cache.v):
        attention, ff = layer.attention, layer.feed_forward
        q, h = qkv_kernel.norm_qkv_rope_triton(x, residual, layer.attention_norm.weight, eps, attention.wqkv.weight,
                                               gpt.rope, pos, cache_k, cache_v, 0, workspace=workspace,
                                               config=config)
        attn = attention_kernel.decode_attention_triton(q, cache_k, cache_v, 0, pos, cache.key_valid, position + 1,
                                                        num_splits=num_splits)
        out = gemm.skinny_linear_triton(attn.transpose(1, 2).reshape(R, 1, d), attention.wo.weight,
                                        workspace=workspace, config=config)
        hidden, h = w13_kernel.norm_w13_swiglu_triton(out, h, layer.ffn_norm.weight, eps, ff.w13,
                                                      workspace=workspace, config=config)
        x, residual = gemm.skinny_linear_triton(hidden, ff.w2.weight, workspace=workspace, config=config), h
    assert_counters_reset(workspace)
    return add_rmsnorm_triton(x, residual, gpt.norm.weight, eps)[0]


@pytest.fixture
def triton_launches(monkeypatch):
    """Counts interpreted Triton launches by kernel name."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    if not gemm.INTERPRETED:
        pytest.skip("counts interpreted launches")
    counts = Counter()
    run = interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted)
    return counts


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_fused_decode_step_is_the_models_decode_step_in_five_or_six_launches_per_layer(model_type,
                                                                                         triton_launches):
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
    split_config = Config(16, 16, 16, 2, 4, 1)  # every GEMM split in 2: the workspace is shared by all of them
    with torch.no_grad():
        gpt.forward_hidden(torch.cat([gpt.condition_embeddings(cond), gpt.embed_tokens(tokens[:, :2])], 1), cache)
        position = T + 2
        filled = [(k.clone(), v.clone()) for k, v in zip(cache.k, cache.v)]
        want = gpt.forward_hidden(gpt.embed_tokens(tokens[:, 2:]), cache, start=position)
        want_cache = [(k.clone(), v.clone()) for k, v in zip(cache.k, cache.v)]
        for num_splits, launches_per_layer in ((1, 5), (3, 6)):
            for ck, cv, (k, v) in zip(cache.k, cache.v, filled):
                ck.copy_(k)
                cv.copy_(v)
            triton_launches.clear()
            got = fused_decode_step(gpt, cache, tokens[:, 2], position, num_splits, split_config)
            # the final norm is one more launch; everything else is per layer
            assert sum(triton_launches.values()) == c.n_layer * launches_per_layer + 1, triton_launches
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            for ck, cv, (k, v) in zip(cache.k, cache.v, want_cache):
                torch.testing.assert_close(ck, k, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(cv, v, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- argument checks

def test_bad_arguments_raise_invalid_argument():
    x, w = randn(3, 8), randn(5, 8)
    q_x, nw = randn(2, 1, 8), randn(8)
    wqkv = randn(3 * 2 * 4, 8)
    rope, pos = randn(10, 2, 2), torch.tensor([4], device=DEVICE)
    cache = torch.zeros(3, 2, 10, 4, device=DEVICE)
    cases = [
        (gemm.skinny_linear_triton, (x, randn(5, 7)), {}, r"weight must be \[N > 0, 8\]"),
        (gemm.skinny_linear_triton, (x, w.double()), {}, "weight must have dtype torch.float32"),
        (gemm.skinny_linear_triton, (x.long(), w), {}, "x must be a floating-point tensor"),
        (gemm.skinny_linear_triton, (x, w), dict(config=Config(24, 16, 16, 1, 4, 1)),
         "config.block_m must be a power of two >= 16"),
        (gemm.skinny_linear_triton, (x, w), dict(config=Config(16, 16, 16, 17, 4, 1)),
         r"config.split_k must be in \[1, 16\]"),
        (gemm.skinny_linear_triton, (x, w), dict(config=(16, 16, 16, 1, 4, 1)),
         "config must be a skinny_gemm.GemmConfig"),
        (gemm.skinny_linear_triton, (randn(3, 64), randn(5, 64)),
         dict(workspace=torch.zeros(4), config=Config(16, 16, 16, 2, 4, 1)),
         "workspace must be None or a skinny_gemm.SplitKWorkspace"),
        (qkv_kernel.norm_qkv_rope_triton, (x, None, nw, 1e-5, wqkv, rope, pos, cache, cache, 0), {},
         r"x must be \[R, L, d\]"),
        (qkv_kernel.norm_qkv_rope_triton, (q_x, None, nw, 1e-5, randn(20, 8), rope, pos, cache, cache, 0), {},
         r"wqkv must be \[3\*H\*D, d\] = \[24, 8\]"),
        (qkv_kernel.norm_qkv_rope_triton, (q_x, None, nw, 1e-5, wqkv, rope, pos.float(), cache, cache, 0), {},
         "positions must be an int64 tensor"),
        (qkv_kernel.norm_qkv_rope_triton, (q_x, None, nw, 1e-5, wqkv, rope, pos, cache, cache, 2), {},
         r"row_start must be an int in \[0, 1\]"),
        (qkv_kernel.norm_qkv_rope_triton, (q_x, None, nw, 1e-5, wqkv, randn(10, 3, 2), pos, cache, cache, 0), {},
         r"rope must be a \(cos, sin\) table \[P, 2, 2\]"),
        (qkv_kernel.norm_qkv_rope_triton, (q_x, None, nw, 0.0, wqkv, rope, pos, cache, cache, 0), {},
         "eps must be a finite number > 0"),
        (qkv_kernel.norm_qkv_rope_triton, (q_x, None, nw, 1e-5, wqkv.double(), rope, pos, cache, cache, 0), {},
         "wqkv must have dtype torch.float32"),
        (w13_kernel.norm_w13_swiglu_triton, (x, None, nw, 1e-5, randn(7, 8)), {}, "even number of rows"),
        (w13_kernel.norm_w13_swiglu_triton, (x, None, nw, 1e-5, randn(6, 9)), {}, r"w13 must be \[N > 0, 8\]"),
        (w13_kernel.norm_w13_swiglu_triton, (x, randn(3, 7), nw, 1e-5, randn(6, 8)), {}, "residual must match x"),
    ]
    for launcher, args, kwargs, match in cases:
        with pytest.raises(InvalidArgument, match=match):
            launcher(*args, **kwargs)
    # the references' check functions refuse the same inputs (one set of checks for both paths)
    with pytest.raises(InvalidArgument, match=r"x must be \[R, L, d\]"):
        op_checks.check_norm_qkv_rope_args(x, None, nw, 1e-5, wqkv, rope, pos, cache, cache, 0)
    with pytest.raises(InvalidArgument, match="even number of rows"):
        op_checks.check_norm_w13_swiglu_args(x, None, nw, 1e-5, randn(7, 8))
    with pytest.raises(InvalidArgument, match=r"weight must be \[N > 0, 8\]"):
        op_checks.check_skinny_linear_args(x, randn(5, 7))


# ---------------------------------------------------------------------- GPU compile (no GPU needed)

AOT_SCRIPT = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("kernel_resources", sys.argv[1])
R = importlib.util.module_from_spec(spec)
spec.loader.exec_module(R)  # pops TRITON_INTERPRET before triton compiles anything
import triton
if "nvidia" not in triton.backends.backends:
    sys.exit(77)
for row in R.block_report("bf16"):
    print("compiled", row["op"], row["preset"], row["rows"], row["dtype"], row["kernel"], "stack", row["stack_bytes"],
          "shared", row["shared_bytes"])
for dtype in ("fp32", "fp16"):
    for row in R.block_report(dtype, shapes=(("GPT-XL", 16),)):
        print("compiled", row["op"], row["preset"], row["rows"], row["dtype"], row["kernel"], "stack",
              row["stack_bytes"], "shared", row["shared_bytes"])
"""


@pytest.mark.slow
def test_decode_layer_kernels_compile_for_sm90_at_the_issue_shapes():
    """Every decode-layer kernel through ptxas for an H100 (sm_90a) with exactly the arguments, constexprs and
    options its launcher passes at GPT-B 2 rows, GPT-XL 16 and 128 rows (bf16), and GPT-XL 16 rows in fp32 and
    fp16: type and layout errors the interpreter lets through, register spills, and shared memory over the
    227 KB an sm_90 block can have."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    helper = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT, str(helper)], env=env, capture_output=True, text=True,
                          timeout=900)
    if done.returncode == 77:
        pytest.skip("triton has no nvidia backend here")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("compiled")]
    ops = Counter(line[1] for line in lines)
    # per shape: fused qkv, attention split (+ combine at GPT-B 2 rows), wo, fused w13, w2
    assert ops["norm_qkv_rope"] == 5 and ops["norm_w13_swiglu"] == 5 and ops["wo"] == 5 and ops["w2"] == 5, ops
    assert ops["decode_attention"] >= 5, ops
    for line in lines:
        stack, shared = int(line[line.index("stack") + 1]), int(line[line.index("shared") + 1])
        assert shared <= 227 * 1024, line
        if line[4] == "bf16":
            assert stack == 0, f"register spills: {line}"
