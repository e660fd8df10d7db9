"""The fused Triton guided-sampling kernel against the torch reference in guidance.py.

Without CUDA this runs the kernel on CPU tensors under the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported). fp32, small shapes; statistics use many rows
holding the same logits (one draw per row) and the chi-square check of test_guidance (alpha 1e-6).
"""
import pytest
import torch

from llamagen_core2.errors import InvalidArgument
from llamagen_core2.guidance import filter_logits, guided_sample, mix_guidance
from test_guidance import assert_follows, gap_top_p

fgs = pytest.importorskip("llamagen_core2.kernels.fused_guided_sample")
from llamagen_core2.kernels import dispatch  # noqa: E402

DEVICE = "cpu" if fgs.INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA and the kernel was not built for the interpreter", allow_module_level=True)

MODES = ("cond", "cfg", "fast", "slow")


def logits3(batch, vocab, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(batch, vocab, generator=g) * scale).to(DEVICE) for _ in range(3))


def reference_probs(row: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0):
    """Sampling distribution of the torch reference for one mixed row [V], as float64 numpy."""
    filtered = filter_logits((row.float() / temperature)[None].cpu(), top_k=top_k, top_p=top_p)
    return torch.softmax(filtered.double(), dim=-1)[0].numpy()


def kernel(cond, uncond=None, weak=None, **kw):
    kw.setdefault("seed", 1234)
    return fgs.fused_guided_sample(cond, uncond, weak, **kw)


# ---------------------------------------------------------------- mixing

@pytest.mark.parametrize("vocab", [111, 1000, 16384])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per_row"])
def test_mixed_logits_match_reference_every_mode(vocab, batch, per_row):
    c, u, w = logits3(batch, vocab, seed=vocab + batch)
    if per_row:  # includes rows with scale <= 1 (cond-only CFG)
        s = torch.tensor([4.0, 1.0, 2.5, 0.5, 7.0][:batch], device=DEVICE)
        a = torch.tensor([1.5, 3.0, 0.0, 1.0, 2.0][:batch], device=DEVICE)
    else:
        s, a = 4.0, 1.5
    for mode in MODES:
        _, mixed = kernel(c, u, w, mode=mode, cfg_scale=s, w2s_scale=a, top_k=50, return_mixed=True)
        ref = mix_guidance(c, u, w, mode=mode, cfg_scale=s, w2s_scale=a)
        diff = (mixed - ref).abs().max().item()
        assert diff <= 1e-5, f"mode {mode}: max abs diff {diff}"


def test_half_precision_inputs_are_mixed_in_fp32():
    c, u, _ = logits3(3, 1000, seed=3)
    c, u = c.half(), u.half()
    _, mixed = kernel(c, u, mode="cfg", cfg_scale=3.0, return_mixed=True)
    ref = mix_guidance(c.float(), u.float(), mode="cfg", cfg_scale=3.0)
    assert mixed.dtype == torch.float32 and (mixed - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("vocab", [111, 1000, 16384])
def test_temperature_zero_is_reference_argmax(vocab):
    c, u, w = logits3(5, vocab, seed=11)
    c[0, 7] = c[0, 9] = 100.0  # a tie: first index wins, like torch.argmax
    tokens = kernel(c, u, w, mode="slow", cfg_scale=2.0, w2s_scale=1.5, temperature=0.0, top_k=3, top_p=0.5)
    ref = mix_guidance(c, u, w, mode="slow", cfg_scale=2.0, w2s_scale=1.5).argmax(dim=-1)
    assert torch.equal(tokens.cpu(), ref.cpu())


# ---------------------------------------------------------------- sampling statistics

STAT_CASES = [
    dict(mode="cfg", temperature=1.0, top_k=0, top_p=1.0),
    dict(mode="cfg", temperature=0.7, top_k=20, top_p=1.0),
    dict(mode="slow", temperature=1.3, top_k=0, top_p="gap"),
    dict(mode="fast", temperature=1.0, top_k=30, top_p="gap"),
]


@pytest.mark.parametrize("case", STAT_CASES, ids=lambda c: f"{c['mode']}-t{c['temperature']}-k{c['top_k']}-p{c['top_p']}")
def test_samples_follow_reference_distribution(case):
    c, u, w = logits3(1, 111, seed=21)
    mixed = mix_guidance(c, u, w, mode=case["mode"], cfg_scale=2.0, w2s_scale=1.5)[0]
    t, k = case["temperature"], case["top_k"]
    p = gap_top_p(mixed.cpu().numpy(), t, k) if case["top_p"] == "gap" else 1.0
    n = 4000
    tokens = kernel(c.expand(n, -1), u.expand(n, -1), w.expand(n, -1), mode=case["mode"], cfg_scale=2.0,
                    w2s_scale=1.5, temperature=t, top_k=k, top_p=p, seed=77)
    assert_follows(tokens, reference_probs(mixed, t, k, p), str(case))


@pytest.mark.parametrize("filter_kind", ["top_k", "top_p"])
def test_support_is_exactly_the_reference_support(filter_kind):
    # Nearly flat distinct logits: every kept token is likely to be drawn, so a threshold that is
    # off by one token (in either direction) shows up as a missing or an extra token.
    vocab, n = 1000, 1500
    row = torch.linspace(0.0, 0.2, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(4))]
    knobs = dict(top_k=37) if filter_kind == "top_k" else dict(top_p=gap_top_p(row.numpy(), index=40))
    tokens = kernel(row.to(DEVICE).expand(n, -1), mode="cond", **knobs)
    support = set(torch.from_numpy(reference_probs(row, **knobs) > 0).nonzero().flatten().tolist())
    assert set(tokens.cpu().tolist()) == support


def test_large_vocab_never_leaves_top_k_top_p_support():
    c, u, _ = logits3(1, 16384, seed=5, scale=0.05)  # nearly flat: a leak would be frequent
    n = 48
    mixed = mix_guidance(c, u, mode="cfg", cfg_scale=4.0)[0]
    for knobs in (dict(top_k=2000), dict(top_k=2000, top_p=0.5)):
        tokens = kernel(c.expand(n, -1), u.expand(n, -1), mode="cfg", cfg_scale=4.0, **knobs)
        allowed = torch.from_numpy(reference_probs(mixed, **knobs) > 0)
        assert allowed[tokens.cpu()].all(), f"{knobs}: token outside the support"
        assert len(set(tokens.tolist())) > n // 2  # many distinct tokens: it really sampled


def test_per_row_knobs_each_follow_their_reference():
    c, _, _ = logits3(1, 111, seed=31)
    row = c[0]
    configs = [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.5, top_k=10, top_p=1.0),
               dict(temperature=2.0, top_k=0, top_p=gap_top_p(row.cpu().numpy(), 2.0, index=20)),
               dict(temperature=0.0, top_k=5, top_p=0.3)]
    n = 4 * 600 + 1  # odd batch, not a multiple of the rows per program
    pick = [configs[i % 4] for i in range(n)]
    knob = {key: torch.tensor([cfg[key] for cfg in pick], device=DEVICE) for key in configs[0]}
    tokens = kernel(c.expand(n, -1), mode="cond", **knob).cpu()
    for i, cfg in enumerate(configs):
        if cfg["temperature"] == 0:
            assert (tokens[i::4] == row.argmax().item()).all()
        else:
            assert_follows(tokens[i::4], reference_probs(row, **cfg), str(cfg))


def test_ties_at_kth_value_are_all_kept():
    row = torch.full((111,), -2.0)
    row[[3, 50, 60, 90]] = torch.tensor([1.0, 0.5, 0.5, 0.5])
    tokens = kernel(row.to(DEVICE).expand(2000, -1), mode="cond", top_k=2)
    assert set(tokens.tolist()) == {3, 50, 60, 90}
    assert_follows(tokens, reference_probs(row, top_k=2), "ties")


def test_ties_at_top_p_cut_are_all_kept_documented_difference():
    # Masses 0.4, 0.2, 0.2, 0.2 and p = 0.5: the crossing token is tied with two others. The kernel
    # keeps all three tied tokens; the reference keeps the one torch.sort puts first.
    row = torch.log(torch.tensor([0.4, 0.2, 0.2, 0.2] + [1e-9] * 7))
    tokens = kernel(row.to(DEVICE).expand(1000, -1), mode="cond", top_p=0.5)
    assert set(tokens.tolist()) == {0, 1, 2, 3}
    assert torch.isfinite(filter_logits(row[None], top_p=0.5)).sum().item() == 2


# ---------------------------------------------------------------- randomness contract

def test_seed_and_offset_determine_the_tokens():
    c, _, _ = logits3(65, 1000, seed=8, scale=0.1)
    a = kernel(c, mode="cond", seed=5, offset=0)
    assert torch.equal(a, kernel(c, mode="cond", seed=torch.tensor([5]), offset=torch.tensor(0)))
    assert not torch.equal(a, kernel(c, mode="cond", seed=5, offset=65 * 1000))
    assert not torch.equal(a, kernel(c, mode="cond", seed=6, offset=0))


def test_tokens_do_not_depend_on_rows_per_program():
    c, u, _ = logits3(7, 111, seed=9)
    packed = kernel(c, u, mode="cfg", cfg_scale=3.0, top_k=40, top_p=0.9, seed=3)
    one_per_row = kernel(c, u, mode="cfg", cfg_scale=3.0, top_k=40, top_p=0.9, seed=3, rows_per_program=1)
    assert torch.equal(packed, one_per_row)


def test_guided_sample_with_triton_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    c, u, w = logits3(5, 1000, seed=12)
    a, mixed = guided_sample(c, u, w, mode="slow", cfg_scale=3.0, w2s_scale=1.5, top_k=100,
                             generator=torch.Generator(DEVICE).manual_seed(1), return_mixed=True)
    b = guided_sample(c, u, w, mode="slow", cfg_scale=3.0, w2s_scale=1.5, top_k=100,
                      generator=torch.Generator(DEVICE).manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (5,)
    ref = mix_guidance(c, u, w, mode="slow", cfg_scale=3.0, w2s_scale=1.5)
    assert (mixed - ref).abs().max().item() <= 1e-5
    allowed = torch.isfinite(filter_logits(ref, top_k=100))
    assert allowed.gather(1, a[:, None]).all()


def test_explicit_triton_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    other = "meta" if DEVICE == "cpu" else "cpu"
    with pytest.raises(dispatch.KernelUnavailable, match="LLAMAGEN_CORE2_KERNELS=triton but"):
        dispatch.select_backend(torch.device(other))


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, match", [
    (dict(cond=torch.zeros(2, fgs.MAX_VOCAB + 1)), r"vocab size must be <= 65536"),
    (dict(uncond=torch.zeros(2, 6)), "uncond must have the shape"),
    (dict(weak=torch.zeros(3, 5), mode="slow"), "weak must have the shape"),
    (dict(cfg_scale=torch.ones(3)), r"cfg_scale must be a number or a tensor of shape \[2\]"),
    (dict(top_p=torch.ones(1, 2)), r"top_p must be a number or a tensor of shape \[2\]"),
    (dict(w2s_scale=-1.0, mode="slow", weak=torch.zeros(2, 5)), "w2s_scale must be >= 0"),
    (dict(top_k=torch.tensor([3, -1])), "top_k must be an integer >= 0"),
    (dict(mode="fast"), "needs the weak-model prediction"),
    (dict(uncond=None, cfg_scale=3.0), "needs the unconditional output"),
    (dict(mode="bogus"), "mode must be one of"),
    (dict(seed=-1), r"seed must be an int in \[0, 2\*\*63\)"),
    (dict(offset=torch.zeros(2, dtype=torch.long)), "offset must be an integer tensor with one element"),
    (dict(cond=torch.zeros(0, 5)), r"cond must be \[B, V\] with B > 0"),
])
def test_bad_inputs_raise_invalid_argument(kwargs, match):
    args = dict(cond=torch.zeros(2, 5), uncond=torch.zeros(2, 5), weak=None, mode="cfg", cfg_scale=2.0)
    args.update(kwargs)
    tensors = [args.pop(name) for name in ("cond", "uncond", "weak")]
    tensors = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors]
    with pytest.raises(InvalidArgument, match=match):
        fgs.fused_guided_sample(*tensors, **args)


# ---------------------------------------------------------------- GPU compile smoke test (no GPU needed)

AOT_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
if "nvidia" not in triton.backends.backends:
    sys.exit(77)
from llamagen_core2.kernels import fused_guided_sample as F
ptr = {"top_k_ptr": "*i64", "seed_ptr": "*i64", "offset_ptr": "*i64", "tokens_ptr": "*i64"}
consts = {"MODE": 3, "WRITE_MIXED": True, "BLOCK_ROWS": None, "BLOCK_V": None}
for vocab in (16384, 1000):
    block_rows, block_v, num_warps = F.launch_config(vocab, on_gpu=True)
    consts.update(BLOCK_ROWS=block_rows, BLOCK_V=block_v)
    sig = {}
    for name in F._fused_guided_sample_kernel.arg_names:
        sig[name] = "constexpr" if name in consts else ptr.get(name, "*fp32" if name.endswith("_ptr") else "i32")
    kernel = triton.compile(ASTSource(F._fused_guided_sample_kernel, sig, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert len(kernel.asm["cubin"]) > 0
    print("compiled", vocab, block_rows, block_v, num_warps)
"""


def test_kernel_compiles_for_sm90_with_the_launch_config():
    """Lowers the kernel through ptxas for an H100 target (sm_90a) without a GPU: catches shape or
    type errors that the interpreter (numpy broadcasting) would let through."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode == 77:
        pytest.skip("triton has no nvidia backend here")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == 2
