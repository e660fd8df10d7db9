"""The fused Triton guided-sampling kernels against the torch reference in guidance/sampling.py.

Without CUDA this runs the kernels on CPU tensors under the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported). fp32, small shapes; statistics use many rows
holding the same logits (one draw per row) and the chi-square check of test_guidance (alpha 1e-6).
The interpreter costs ~25 ms per program of the select kernel, so the one-row-per-program paths
are checked on few rows, by exact agreement with the packed path and the torch reference; every
path of the select (fast accept, rejection rounds, refinement, the bounded exact path, streamed
passes) is forced by a launch-config knob and must give the same tokens; the exact k-th key is
checked directly against torch.topk through a small probe kernel.
"""
import pytest
import torch

from llamagen_core2.errors import InvalidArgument
from llamagen_core2.guidance import filter_logits, guided_sample, mix_guidance
from test_guidance import assert_follows, gap_top_p

fgs = pytest.importorskip("llamagen_core2.kernels.fused_guided_sample")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

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
    kw.setdefault("seeds", 1234)
    return fgs.fused_guided_sample(cond, uncond, weak, **kw)


def config(batch, vocab, **kw):
    return fgs.launch_config(batch, vocab, DEVICE, **kw)


# ---------------------------------------------------------------- mixing

@pytest.mark.parametrize("vocab", [111, 1000, 16384])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per_row"])
def test_mixed_logits_match_reference_every_mode(vocab, batch, per_row):
    """Bit-exact: the kernels are compiled with FMA contraction disabled (enable_fp_fusion=False),
    so `u + s * (c - u)` rounds after the product exactly like torch's separate ops. (Contracted,
    it moved values around 100 by 2 ulp on an H100.)"""
    c, u, w = logits3(batch, vocab, seed=vocab + batch)
    if per_row:  # includes rows with scale <= 1 (cond-only CFG)
        s = torch.tensor([4.0, 1.0, 2.5, 0.5, 7.0][:batch], device=DEVICE)
        a = torch.tensor([1.5, 3.0, 0.0, 1.0, 2.0][:batch], device=DEVICE)
    else:
        s, a = 4.0, 1.5
    split = config(batch, vocab, blocks_per_row=4)
    for mode in MODES:
        ref = mix_guidance(c, u, w, mode=mode, cfg_scale=s, w2s_scale=a)
        for cfg in (None, split):
            _, mixed = kernel(c, u, w, mode=mode, cfg_scale=s, w2s_scale=a, top_k=50, return_mixed=True, config=cfg)
            assert torch.equal(mixed, ref), f"mode {mode}: max abs diff {(mixed - ref).abs().max().item()}"


def test_half_precision_inputs_are_mixed_in_fp32():
    c, u, _ = logits3(3, 1000, seed=3)
    for dtype in (torch.float16, torch.bfloat16):
        ch, uh = c.to(dtype), u.to(dtype)
        _, mixed = kernel(ch, uh, mode="cfg", cfg_scale=3.0, return_mixed=True)
        ref = mix_guidance(ch.float(), uh.float(), mode="cfg", cfg_scale=3.0)
        assert mixed.dtype == torch.float32 and torch.equal(mixed, ref)


@pytest.mark.parametrize("vocab", [111, 1000, 16384])
def test_temperature_zero_is_reference_argmax(vocab):
    c, u, w = logits3(5, vocab, seed=11)
    for t in (c, u, w):  # exact ties in the mixed logits: the first index wins, like torch.argmax
        t[0, 7] = t[0, 9] = 100.0
        t[1, vocab - 1] = t[1, 0] = 100.0  # between the first and the last block
    ref = mix_guidance(c, u, w, mode="slow", cfg_scale=2.0, w2s_scale=1.5).argmax(dim=-1)
    for cfg in (None, config(5, vocab, blocks_per_row=8)):
        tokens = kernel(c, u, w, mode="slow", cfg_scale=2.0, w2s_scale=1.5, temperature=0.0, top_k=3, top_p=0.5,
                        config=cfg)
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
                    w2s_scale=1.5, temperature=t, top_k=k, top_p=p, seeds=77, config=config(n, 111, blocks_per_row=4))
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
    mixed = mix_guidance(c, u, mode="cfg", cfg_scale=4.0)[0]
    for n, cfg in ((48, None), (6, config(6, 16384, rows_per_program=1, blocks_per_row=16))):
        for knobs in (dict(top_k=2000), dict(top_k=2000, top_p=0.5)):
            tokens = kernel(c.expand(n, -1), u.expand(n, -1), mode="cfg", cfg_scale=4.0, config=cfg, **knobs)
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
    row[[3, 50, 60, 90]] = torch.tensor([1.0, 0.5, 0.5, 0.5])  # with 4 blocks of 32: in blocks 0, 1, 1, 2
    for cfg in (None, config(2000, 111, blocks_per_row=4)):
        tokens = kernel(row.to(DEVICE).expand(2000, -1), mode="cond", top_k=2, config=cfg)
        assert set(tokens.tolist()) == {3, 50, 60, 90}
        assert_follows(tokens, reference_probs(row, top_k=2), "ties")


def test_ties_at_top_p_cut_are_all_kept_documented_difference():
    # Masses 0.4, 0.2, 0.2, 0.2 and p = 0.5: the crossing token is tied with two others. The kernel
    # keeps all three tied tokens; the reference keeps the one torch.sort puts first.
    row = torch.log(torch.tensor([0.4, 0.2, 0.2, 0.2] + [1e-9] * 7))
    tokens = kernel(row.to(DEVICE).expand(1000, -1), mode="cond", top_p=0.5)
    assert set(tokens.tolist()) == {0, 1, 2, 3}
    assert torch.isfinite(filter_logits(row[None], top_p=0.5)).sum().item() == 2


# ---------------------------------------------------------------- the split path and the exact k-th key

INT32_MIN = tl.constexpr(-2147483648)
INT32_MAX = tl.constexpr(2147483647)


@triton.jit
def _kth_probe(x_ptr, k_ptr, out_ptr, vocab, BLOCK_V: tl.constexpr, RESIDENT: tl.constexpr, SCAN: tl.constexpr):
    """One row per program: the k-th largest key by the select kernel's exact path (bisection of the bracket),
    on resident keys or streamed from memory."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    row_ok = rows >= 0
    x_rows = x_ptr + rows.to(tl.int64) * vocab
    cols = tl.arange(0, BLOCK_V)
    ok = cols < vocab
    key = fgs._ordered_key(tl.load(x_rows[:, None] + cols[None, :], mask=ok[None, :], other=float("-inf")))
    key = tl.where(ok[None, :], key, INT32_MIN)
    k = tl.load(k_ptr + rows)
    zero = tl.zeros([1], tl.float32)
    kth, _ = fgs._kth_bisect(key, x_rows, x_rows, row_ok, vocab, row_ok, k, tl.full([1], INT32_MIN + 1, tl.int32),
                             zero, tl.full([1], INT32_MAX, tl.int32), zero, zero, False, RESIDENT, BLOCK_V, SCAN)
    tl.store(out_ptr + rows, kth)


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "streamed"])
def test_kth_largest_select_is_exact(resident):
    """Against torch.topk on rows built to stress the bisection: ties at the k-th value, +-0.0, negatives,
    -inf, values one ulp apart, a constant row, and k = 1 and k = V - 1 (the bounded exact path)."""
    vocab = 300
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(vocab, generator=g) * 10 for _ in range(4)]
    rows.append(torch.randint(-3, 4, (vocab,), generator=g).float())              # many ties
    zeros = torch.zeros(vocab)
    zeros[::2] = -0.0
    zeros[:5] = torch.tensor([1.0, -1.0, float("-inf"), 1e-38, -1e-38])
    rows.append(zeros)                                                            # +-0.0, denormal-ish, -inf
    rows.append(torch.nextafter(torch.full((vocab,), 7.0), torch.tensor(8.0)) * torch.ones(vocab))
    rows[-1][::3] = 7.0                                                           # one ulp apart
    rows.append(torch.full((vocab,), -5.0))                                       # constant
    x = torch.stack(rows)
    ks = torch.tensor([1, 7, 150, vocab - 1, 100, 3, 120, 42])
    out = torch.empty(len(rows), dtype=torch.int32, device=DEVICE)
    _kth_probe[(len(rows),)](x.to(DEVICE), ks.to(torch.int32).to(DEVICE), out, vocab, BLOCK_V=512,
                             RESIDENT=resident, SCAN=64)
    kth = torch.stack([torch.topk(x[i], int(ks[i])).values[-1] for i in range(len(rows))])
    bits = kth.where(kth != 0, 0.0).view(torch.int32)
    expected = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    assert torch.equal(out.cpu(), expected)
    assert torch.equal(fgs.ordered_keys(kth), expected)  # the torch select path's key map is the kernel's


def test_tokens_do_not_depend_on_the_launch_config():
    """Split rows (block partials combined), one row per program, packed rows, streamed rows and the
    bounded exact path (rejection_rounds=0) give the same tokens: the thresholds are exact integer
    selects and the race noise depends only on (seeds, offset).
    Odd batch, V not a multiple of the block, per-row knobs mixing greedy, top-k, top-p and both,
    small k / p on nearly flat rows so that the race winner is often cut (the extra argmax pass)
    and top-p rejects it (the rejection rounds)."""
    batch, vocab = 13, 1000
    c, u, _ = logits3(batch, vocab, seed=9, scale=0.3)
    c[3, 100:140] = 2.0  # ties that straddle the 128-column blocks at the k-th value
    knobs = dict(temperature=torch.tensor([1.0, 0.7, 0.0, 1.3] * 3 + [1.0], device=DEVICE),
                 top_k=torch.tensor([0, 5, 40, 12, 3, 0, 900, 17, 0, 1, 64, 7, 30], device=DEVICE),
                 top_p=torch.tensor([0.3, 1.0, 0.9, 0.5, 1.0, 0.05, 0.9, 1.0, 0.6, 0.5, 0.2, 0.8, 0.4], device=DEVICE))
    results = {}
    for name, cfg in [("default", None), ("split", config(batch, vocab, blocks_per_row=8)),
                      ("one row", config(batch, vocab, rows_per_program=1, blocks_per_row=2)),
                      ("exact", config(batch, vocab, rejection_rounds=0)),
                      ("one row+exact", config(batch, vocab, rows_per_program=1, rejection_rounds=0)),
                      ("streamed", config(batch, vocab, rows_per_program=2, resident=False, scan_chunk=128))]:
        results[name] = kernel(c, u, mode="cfg", cfg_scale=3.0, seeds=3, config=cfg, **knobs).cpu()
    for name, tokens in results.items():
        assert torch.equal(tokens, results["default"]), name
    one = dict(mode="cfg", cfg_scale=3.0, top_k=9, top_p=0.4, seeds=torch.tensor([11], device=DEVICE))  # batch 1
    single = [kernel(c[3:4], u[3:4], config=cfg, **one) for cfg in
              (None, config(1, vocab, blocks_per_row=16), config(1, vocab, rows_per_program=1, rejection_rounds=0))]
    assert all(torch.equal(t, single[0]) for t in single)
    mixed = mix_guidance(c, u, mode="cfg", cfg_scale=3.0).cpu()
    for i in range(batch):
        t, k, p = (float(knobs[n][i]) for n in ("temperature", "top_k", "top_p"))
        if t == 0:
            assert results["default"][i] == mixed[i].argmax()
        else:
            assert reference_probs(mixed[i], t, int(k), p)[results["default"][i]] > 0


# ---------------------------------------------------------------- the select paths (docs/sampling.md#the-select-path)

def first_test(mixed: torch.Tensor, temperature, top_k, top_p, keys, offset) -> list:
    """Host replay (float64 masses) of the select's first test of the unfiltered race winner, per row:
    "accept", "reject", "undecided" (top-k + top-p: the top-k mass must be bracketed) or "off"."""
    from llamagen_core2.guidance.philox import race_uniforms

    batch, vocab = mixed.shape
    t = torch.as_tensor(temperature, dtype=torch.float32).expand(batch)
    k = torch.as_tensor(top_k).expand(batch)
    p = torch.as_tensor(top_p, dtype=torch.float32).expand(batch)
    x = mixed.float().cpu() / torch.where(t == 0, torch.ones_like(t), t)[:, None]
    score = x - torch.log(-torch.log(race_uniforms(keys.cpu(), offset, batch, vocab)))
    out = []
    for b in range(batch):
        topk_on, topp_on = bool(0 < k[b] < vocab), bool(p[b] < 1)
        if t[b] == 0 or not (topk_on or topp_on):
            out.append("off")
            continue
        w = int(score[b].argmax())
        xb = x[b].double()
        e = torch.exp(xb - xb.max())
        above, at, total = float(e[xb > xb[w]].sum()), float(e[xb >= xb[w]].sum()), float(e.sum())
        k_ok = not topk_on or int((xb > xb[w]).sum()) < int(k[b])
        if not k_ok or (topp_on and above > p[b] * total):
            out.append("reject")
        elif not topp_on or above <= p[b] * (total if not topk_on else at):
            out.append("accept")
        else:
            out.append("undecided")
    return out


PATH_CONFIGS = {  # launch-config knobs that force each path of the select
    "rejection": {},                                                   # accept / reject / refine, 8 rejections
    "one rejection": dict(rejection_rounds=1, value_steps=0),          # then the exact path; integer refinement
    "exact": dict(rejection_rounds=0),                                 # the bounded exact path for every row
    "streamed": dict(resident=False, scan_chunk=256),                  # passes stream the rows from scratch
    "one row": dict(rows_per_program=1, blocks_per_row=4),             # split mix + one row per select program
}


@pytest.mark.parametrize("filters", ["top_k", "top_p", "both"])
def test_every_select_path_gives_the_reference_tokens(filters, monkeypatch):
    """The fast accept, the rejection rounds (and top-k + top-p refinements), the bounded exact path and the
    streamed passes, each forced by a launch-config knob, give the torch reference's tokens on an odd batch
    with per-row knobs (greedy rows, rows with the filter off, small and large k / p); the host replay of the
    first test shows that the inputs exercise the accept, the reject and (both) the undecided branch."""
    batch, vocab = 37, 1000
    c, u, _ = logits3(batch, vocab, seed=61, scale=0.4)
    keys = torch.arange(batch, device=DEVICE) * 7919 + 5
    n = torch.arange(batch)
    temperature = torch.where(n % 9 == 4, 0.0, 0.8 + 0.1 * (n % 4).float())
    top_k = torch.tensor([0, 3, 40, 400, 2000])[n % 5] if filters != "top_p" else torch.zeros(batch, dtype=torch.long)
    top_p = torch.tensor([1.0, 0.05, 0.4, 0.9])[n % 4] if filters != "top_k" else torch.ones(batch)
    knobs = dict(mode="cfg", cfg_scale=2.0, temperature=temperature.to(DEVICE), top_k=top_k.to(DEVICE),
                 top_p=top_p.to(DEVICE), seeds=keys, offset=77)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    reference = guided_sample(c, u, **knobs).cpu()
    for name, knob in PATH_CONFIGS.items():
        tokens = kernel(c, u, config=config(batch, vocab, **knob), **knobs).cpu()
        assert torch.equal(tokens, reference), f"{name}: rows {(tokens != reference).nonzero().flatten().tolist()}"
    outcomes = first_test(mix_guidance(c, u, mode="cfg", cfg_scale=2.0), temperature, top_k, top_p, keys, 77)
    assert outcomes.count("accept") >= 3 and outcomes.count("reject") >= 3, outcomes
    if filters == "both":
        assert outcomes.count("undecided") >= 1, outcomes


def test_torch_select_candidate_gives_the_kernel_tokens():
    """select="torch" (torch.topk / torch.sort thresholds between the launches: the graph-capturable candidate
    the dispatch times against the kernel) and select="kernel" draw the same tokens: per-row knobs with
    greedy and unfiltered rows, batch 1 and an odd batch, an explicit and an inferred top_k_max."""
    for batch, vocab in ((1, 700), (13, 1000)):
        c, u, _ = logits3(batch, vocab, seed=batch, scale=0.5)
        n = torch.arange(batch)
        knobs = dict(mode="cfg", cfg_scale=3.0, seeds=torch.arange(batch, device=DEVICE) + 1, offset=5,
                     temperature=torch.where(n % 6 == 5, 0.0, 1.0).to(DEVICE),
                     top_k=torch.tensor([50, 0, 7, 600])[n % 4].to(DEVICE),
                     top_p=torch.tensor([1.0, 0.6, 0.3])[n % 3].to(DEVICE))
        fused = kernel(c, u, **knobs)
        assert torch.equal(kernel(c, u, select="torch", **knobs), fused)
        assert torch.equal(kernel(c, u, select="torch", top_k_max=600, filters=(True, True), **knobs), fused)
    scalar = dict(mode="cond", top_k=30, top_p=0.5, seeds=9)
    assert torch.equal(kernel(c, select="torch", **scalar), kernel(c, **scalar))


def test_the_guards_two_candidates_draw_the_same_tokens():
    """fused_guided_sample.select_candidates: the two runs the engine's guard times (the rejection select and the
    torch thresholds, per-row knobs as in the decode graph) return the same tokens."""
    batch, vocab = 5, 600
    knobs = dict(temperature=torch.tensor([1.0, 0.0, 0.7, 1.0, 1.2], device=DEVICE),
                 top_k=torch.tensor([20, 5, 0, 300, 2], device=DEVICE),
                 top_p=torch.tensor([0.9, 1.0, 0.5, 1.0, 0.3], device=DEVICE),
                 seeds=torch.arange(batch, device=DEVICE) + 100)
    kernel_run, torch_run = fgs.select_candidates(batch, vocab, DEVICE, filters=(True, True), top_k_max=300, **knobs)
    assert (kernel_run.name, kernel_run.backend, torch_run.name, torch_run.backend) == ("kernel", "triton", "torch",
                                                                                       "torch")
    tokens = kernel_run.run()
    assert tokens.shape == (batch,) and torch.equal(tokens, torch_run.run())


def test_top_p_crossing_token_over_the_top_k_mass():
    """top-p keeps the token that crosses p, and measures mass over the top-k kept set (LlamaGen filters
    top-k first): masses 0.4, 0.3, 0.2, 0.1 with p = 0.5 keep {0, 1} (token 1 crosses), but with top-k 2
    the renormalised masses 0.571, 0.429 keep {0} only -- a winner t = 1 there is undecided by the first
    test's bounds and settled by bracketing the k-th key. Every path, and the frequencies."""
    row = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1] + [1e-6] * 7)).to(DEVICE)
    n = 2000
    for knobs, support in ((dict(top_p=0.5), {0, 1}), (dict(top_k=2, top_p=0.5), {0}),
                           (dict(top_k=3, top_p=0.6), {0, 1})):
        # (not "one row": 2000 programs cost ~25 ms each under the interpreter; the 37-row test covers it)
        results = [kernel(row.expand(n, -1), mode="cond", seeds=3, config=config(n, 11, **knob), **knobs).cpu()
                   for name, knob in PATH_CONFIGS.items() if name != "one row"]
        assert all(torch.equal(r, results[0]) for r in results), knobs
        assert set(results[0].tolist()) == support, knobs
        assert_follows(results[0], reference_probs(row, **knobs), str(knobs))


@pytest.mark.parametrize("case", ["rejections", "exact"])
def test_flat_rows_with_small_top_k_follow_the_reference_distribution(case):
    """Nearly flat logits and top-k 12 of 300: the unfiltered winner is rejected ~96% of the time, so the
    tokens come from the rejection rounds (or, forced, the exact path); chi-square against the exact
    top-k (+ top-p) softmax."""
    row = (torch.randn(300, generator=torch.Generator().manual_seed(8)) * 0.3).to(DEVICE)
    n = 3000
    knob = {} if case == "rejections" else dict(rejection_rounds=0)
    for knobs in (dict(top_k=12), dict(top_k=12, top_p=gap_top_p(row.cpu().numpy(), top_k=12, index=7))):
        tokens = kernel(row.expand(n, -1), mode="cond", seeds=21, config=config(n, 300, **knob), **knobs)
        assert_follows(tokens, reference_probs(row, **knobs), f"{case} {knobs}")


def test_vocab_65536_matches_the_reference():
    """V = 65536 (the largest supported, other AR image models): resident (interpreter default) and streamed
    passes (the GPU's layout beyond 16384) give the torch reference's tokens, top-k 2000 + top-p on flat rows."""
    batch, vocab = 3, 65536
    c, u, _ = logits3(batch, vocab, seed=65, scale=0.2)
    knobs = dict(mode="cfg", cfg_scale=2.0, top_k=torch.tensor([2000, 0, 5], device=DEVICE),
                 top_p=torch.tensor([0.9, 0.5, 1.0], device=DEVICE), temperature=1.0, seeds=torch.tensor([1, 2, 3]),
                 offset=0)
    reference = guided_sample(c, u, backend="torch", **knobs).cpu()
    for knob in ({}, dict(resident=False, scan_chunk=8192, rows_per_program=1)):
        assert torch.equal(kernel(c, u, config=config(batch, vocab, **knob), **knobs).cpu(), reference), knob


def test_filter_flags_compile_filters_out_and_skip_the_scratch_rows():
    """filters=(False, False) with knobs that leave every row unfiltered: the same tokens, and rows promised
    unfiltered are not filtered (the flag is the host's promise; the engine derives it from the knobs)."""
    c, u, _ = logits3(4, 500, seed=2)
    plain = dict(mode="cfg", cfg_scale=2.0, seeds=torch.arange(4, device=DEVICE),
                 top_k=torch.zeros(4, dtype=torch.long, device=DEVICE), top_p=torch.ones(4, device=DEVICE))
    assert torch.equal(kernel(c, u, filters=(False, False), **plain), kernel(c, u, **plain))
    assert torch.equal(kernel(c, u, filters=(False, False), **plain), kernel(c, u, filters=(True, True), **plain))
    with pytest.raises(InvalidArgument, match=r"filters must be None or a pair of bools"):
        kernel(c, u, filters=(1, 0), **plain)
    with pytest.raises(InvalidArgument, match=r"select must be one of \('kernel', 'torch'\)"):
        kernel(c, u, select="sort", **plain)


# ---------------------------------------------------------------- randomness contract

def test_seeds_and_offset_determine_the_tokens():
    c, _, _ = logits3(65, 1000, seed=8, scale=0.1)
    a = kernel(c, mode="cond", seeds=5, offset=0)
    assert torch.equal(a, kernel(c, mode="cond", seeds=torch.tensor([5], device=DEVICE),
                                 offset=torch.tensor(0, device=DEVICE)))
    assert not torch.equal(a, kernel(c, mode="cond", seeds=5, offset=65 * 1000))
    assert not torch.equal(a, kernel(c, mode="cond", seeds=6, offset=0))
    per_row = torch.arange(65, device=DEVICE) * 7919 + 2 ** 40
    b = kernel(c, mode="cond", seeds=per_row, offset=2 ** 33)
    assert torch.equal(b, kernel(c, mode="cond", seeds=per_row, offset=torch.tensor([2 ** 33], device=DEVICE)))
    assert not torch.equal(b, kernel(c, mode="cond", seeds=per_row, offset=2 ** 33 + 1000))


@pytest.mark.parametrize("one_key", [False, True], ids=["per_row_keys", "one_key"])
def test_per_row_offsets_draw_what_one_row_calls_draw(one_key, monkeypatch):
    """offset [B] (one counter base per row, Jacobi decoding): row b of a batched call gives the token of a
    one-row call with offset[b], on both backends, with top-k / top-p on nearly flat rows (the race decides),
    and the two backends agree."""
    batch, vocab = 5, 300
    c, u, _ = logits3(batch, vocab, seed=41, scale=0.2)
    keys = torch.tensor([7], device=DEVICE) if one_key else torch.arange(batch, device=DEVICE) * 977 + 3
    offsets = torch.tensor([0, 3 * vocab, 2 ** 33 + 11, 0, 17], device=DEVICE)
    knobs = dict(mode="cfg", cfg_scale=2.0, top_k=40, top_p=0.8)
    for backend in ("torch", "triton"):
        monkeypatch.setenv(dispatch.ENV_VAR, backend)
        batched = guided_sample(c, u, seeds=keys, offset=offsets, **knobs)
        for b in range(batch):
            key = keys if one_key else keys[b:b + 1]
            one = guided_sample(c[b:b + 1], u[b:b + 1], seeds=key, offset=int(offsets[b]), **knobs)
            assert int(one) == int(batched[b]), (backend, b)
        if backend == "torch":
            reference = batched
    assert torch.equal(batched.cpu(), reference.cpu())
    # different offsets really draw differently: 64 rows of the same logits, offsets 0, V, 2V, ...
    same = c[:1].expand(64, -1)
    tokens = kernel(same, mode="cond", seeds=keys[:1], offset=torch.arange(64, device=DEVICE) * vocab)
    assert len(set(tokens.tolist())) > 20


def test_torch_reference_and_kernel_draw_the_same_tokens(monkeypatch):
    """The shared Philox contract: for the same (seeds, offset) both backends race on the same
    uniforms. Measured under the interpreter on these 512 rows x V 1000: 512 / 512 identical with
    per-row keys and top-k / top-p, 512 / 512 with one key and no filter (numpy's log is the CPU
    libm's, like torch's). On a GPU, tl.log is an approximate `lg2`, so
    a row whose two best race scores are within a few ulps may differ; the top-p cut can also
    differ by rounding (docs/sampling.md). Hence the 99% floor rather than equality."""
    batch, vocab = 512, 1000
    c, u, _ = logits3(batch, vocab, seed=13)
    keys = torch.arange(batch, device=DEVICE) * 1_000_003 + 17
    knobs = dict(mode="cfg", cfg_scale=2.5, temperature=0.9, top_k=200, top_p=0.9, seeds=keys, offset=4096)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    ref = guided_sample(c, u, **knobs)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    fused = guided_sample(c, u, **knobs)
    agreement = (ref == fused).float().mean().item()
    assert agreement >= 0.99, f"only {agreement:.3f} of the rows agree"
    single = dict(knobs, seeds=99, top_k=0, top_p=1.0)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    ref = guided_sample(c, u, **single)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert (ref == guided_sample(c, u, **single)).float().mean().item() >= 0.99


def test_guided_sample_with_triton_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    c, u, w = logits3(5, 1000, seed=12)
    a, mixed = guided_sample(c, u, w, mode="slow", cfg_scale=3.0, w2s_scale=1.5, top_k=100,
                             generator=torch.Generator(DEVICE).manual_seed(1), return_mixed=True)
    b = guided_sample(c, u, w, mode="slow", cfg_scale=3.0, w2s_scale=1.5, top_k=100,
                      generator=torch.Generator(DEVICE).manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (5,)
    ref = mix_guidance(c, u, w, mode="slow", cfg_scale=3.0, w2s_scale=1.5)
    assert torch.equal(mixed, ref)
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
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(mode="fast"), "needs the weak-model prediction"),
    (dict(uncond=None, cfg_scale=3.0), "needs the unconditional output"),
    (dict(mode="bogus"), "mode must be one of"),
    (dict(seeds=-1), r"seeds must be an int in \[0, 2\*\*63\)"),
    (dict(seeds=torch.zeros(3, dtype=torch.long)), r"seeds must be an int, or an integer tensor with 1 or 2"),
    (dict(offset=torch.zeros(3, dtype=torch.long)), r"offset must be an int or an integer tensor with 1 or 2 "
                                                    r"\(one per row\) elements"),
    (dict(offset=2 ** 63 - 5), r"offset must be an int in \[0, 2\*\*63 - 10\]"),
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
import importlib.util, sys, triton
if "nvidia" not in triton.backends.backends:
    sys.exit(77)
spec = importlib.util.spec_from_file_location("kernel_resources", sys.argv[1])
R = importlib.util.module_from_spec(spec)
spec.loader.exec_module(R)  # pops TRITON_INTERPRET before triton compiles anything
F = R.F

# Without the race (whose libdevice log has explicit fma calls) the mixing kernel must hold no fma at all:
# u + s * (c - u) and w + a * (cfg - w) stay a rounded multiply and a rounded add (.rn: ptxas never
# contracts those), like torch's separate ops.
config = R.h100_config(1, 16384)
ptx = R.compile_kernel(F._mix_race_kernel, R.mix_consts(config, MODE=3, WRITE_MIXED=True, SAMPLE=False,
                                                        STORE_ROWS=False), 4).asm["ptx"]
assert "fma" not in ptx and "mul.rn.f32" in ptx and "sub.rn.f32" in ptx, "FMA contraction in the mixing"
print("no contraction")

every = dict(KNOBS_PER_ROW=True, SAMPLE=True)  # every code path of each kernel
for batch, vocab in ((1, 16384), (64, 1000), (1, 65536)):
    config = R.h100_config(batch, vocab)
    for dtype in ("fp32", "bf16", "fp16") if (batch, vocab) == (1, 16384) else ("fp32",):
        kernel = R.compile_kernel(F._mix_race_kernel, R.mix_consts(config, MODE=3, WRITE_MIXED=True, SCALE=True,
                                                                   STORE_ROWS=True, ARGMAX_X=True, **every),
                                  config.mix_warps, dtype, vocab)
        assert len(kernel.asm["cubin"]) > 0
        print("compiled mix", batch, vocab, dtype, config)
    for threshold in (False, True):
        kernel = R.compile_kernel(F._select_kernel, R.select_consts(config, vocab, GREEDY=True, TOPK=True, TOPP=True,
                                                                    THRESHOLD=threshold, **every),
                                  config.select_warps, vocab=vocab)
        assert len(kernel.asm["cubin"]) > 0
        print("compiled select", batch, vocab, threshold, config)
"""


def test_kernels_compile_for_sm90_with_the_launch_config():
    """Lowers both kernels through ptxas for an H100 target (sm_90a) without a GPU, with the launch
    configurations of batch 1 at V = 16384 (split rows, one resident row per select program; fp32 /
    bf16 / fp16 logits), batch 64 at V = 1000 (packed rows) and batch 1 at V = 65536 (streamed rows),
    both select paths (the rejection select and the torch thresholds): catches shape or type errors
    that the interpreter (numpy broadcasting) would let through, and FMA contraction in the mixing."""
    import os
    import subprocess
    import sys

    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    helper = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT, str(helper)], env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode == 77:
        pytest.skip("triton has no nvidia backend here")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled mix") == 5 and done.stdout.count("compiled select") == 6
    assert "no contraction" in done.stdout
