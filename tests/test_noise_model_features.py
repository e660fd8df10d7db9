"""The noise model's prompt inputs follow the official CoRe^2 recipe (prompt_summary.py, docs/diffusion.md).

The official definition is written out in each test (not imported): for one prompt,
    M = the cond / uncond prompt-token matrices stacked along tokens in the pipeline's order
    U, S, Vh = torch.linalg.svd(M.float());  s, v, d = U[:r], S[:r], Vh[:r];  pooled in the same order
with SD3.5 stacking [cond ; uncond] from its own encode_prompt(prompt, negative_prompt="") at 256 T5
tokens, and SDXL stacking [uncond ; cond] with no negative prompt. Shows: rows (not columns) of U on a
matrix whose SVD is built from chosen factors; the halves' order per pipeline on the tiny pipelines;
the user's negative prompt and max_sequence_length leave the summary alone; images per prompt.
"""
import pytest
import torch

from llamagen_core2.diffusion import GuidanceSettings, NoiseModel, NoiseModelConfig, diffuse
from llamagen_core2.diffusion.prompt_summary import prompt_features, prompt_summary
from llamagen_core2.diffusion.tiny import TINY

PROMPTS = ["a red cat on the sea", "a small house in the city"]
RANK = 4
# summary tokens of both halves, token width, pooled width, latent channels, latent side
TINY_SHAPES = {"sdxl": (2 * 77, 64, 64, 4, 16), "sd3": (2 * (77 + 256), 64, 128, 4, 16),
               "flux": (2 * 512, 32, 64, 16, 8)}


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # a fixed sign convention: the factor is a function of the seed


def official_summary(tokens: torch.Tensor, pooled: torch.Tensor, rank: int):
    """The official lines for one prompt: tokens [T, E] (halves stacked), pooled [P]."""
    _s, _v, _d = torch.linalg.svd(tokens.float())
    return _s[:rank], _v[:rank], _d[:rank], pooled.float()


def assert_same_summary(ours, tokens: torch.Tensor, pooled: torch.Tensor, rank: int, atol: float = 1e-4):
    """ours (s, v, d, pooled of one prompt) == the official summary of `tokens`, up to what torch.linalg.svd
    leaves open: the sign of each singular pair, and the basis of U's columns past the rank of `tokens` (the
    tiny pipelines have T > E, and SDXL's zero uncond half caps the rank at 77). Those columns are compared
    through their Gram matrix, which is the same for every basis."""
    s, v, d, p = (t.double() for t in ours)
    s_ref, v_ref, d_ref, p_ref = (t.double() for t in official_summary(tokens, pooled, rank))
    S_all = torch.linalg.svdvals(tokens.double())
    k = int((S_all > 1e-5 * S_all[0]).sum())                   # numerical rank of the token matrix
    assert rank <= k, "the kept triplets must have non-zero singular values for this comparison"
    assert torch.allclose(p, p_ref, atol=atol, rtol=0) and torch.allclose(v, v_ref, atol=atol, rtol=0)
    sign_d = torch.sign((d * d_ref).sum(-1))
    assert torch.allclose(d, sign_d[:, None] * d_ref, atol=atol, rtol=0)
    sign_s = torch.sign((s[:, :k] * s_ref[:, :k]).sum(0))
    sign_s[sign_s == 0] = 1
    assert torch.allclose(s[:, :k], sign_s * s_ref[:, :k], atol=atol, rtol=0)
    visible = s_ref[:, :rank].norm(dim=0) > 0.1                # a column's sign is observable in rows :r
    assert torch.equal(sign_s[:rank][visible], sign_d[visible])  # U's column j and Vh's row j flip together
    assert torch.allclose(s[:, k:] @ s[:, k:].T, s_ref[:, k:] @ s_ref[:, k:].T, atol=atol, rtol=0)


def test_summary_keeps_the_first_rows_of_u_on_a_known_svd(single_thread):
    g = torch.Generator().manual_seed(0)
    T, E, r = 12, 20, 5
    U0, V0 = _orthonormal(T, T, g), _orthonormal(E, T, g)
    S0 = torch.tensor([9.0, 7.5, 6.0, 5.0, 4.2, 3.5, 2.9, 2.4, 2.0, 1.6, 1.3, 1.0], dtype=torch.float64)
    M = (U0 * S0) @ V0.T                                        # [T, E] = U0 diag(S0) V0^T
    pooled = torch.randn(7, generator=g)
    s, v, d, p = prompt_features(M[None].float(), pooled[None], r)
    assert s.shape == (1, r, T) and v.shape == (1, r) and d.shape == (1, r, E)

    # 1. the official definition applied to the same matrix
    ref = official_summary(M.float(), pooled, r)
    for ours, theirs in zip((s[0], v[0], d[0], p[0]), ref):
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)

    # 2. against the chosen factors, up to the sign SVD may give each singular pair
    assert torch.allclose(v[0].double(), S0[:r], atol=1e-4, rtol=0)
    sign_d = torch.sign((d[0].double() * V0[:, :r].T).sum(-1))                   # [r]
    assert torch.allclose(d[0].double(), sign_d[:, None] * V0[:, :r].T, atol=1e-4, rtol=0)
    sign_s = torch.sign((s[0].double() * U0[:r]).sum(0))                         # one per column of U, [T]
    assert torch.allclose(s[0].double(), U0[:r] * sign_s, atol=1e-4, rtol=0)     # ROWS 0..r-1 of U0
    assert torch.equal(sign_s[:r], sign_d)                   # U's column k and Vh's row k flip together
    # the first r COLUMNS of U (transposed to [r, T]) are a different matrix, whatever the signs
    assert (s[0].double().abs() - U0[:, :r].T.abs()).abs().max() > 0.1


def test_summary_pads_past_the_rank_of_tiny_matrices():
    tokens = torch.randn(1, 6, 3)
    s, v, d, _ = prompt_features(tokens, torch.randn(1, 2), 4)
    U, S, Vh = torch.linalg.svd(tokens[0])
    assert torch.allclose(s[0], U[:4], atol=1e-6) and torch.allclose(v[0, :3], S, atol=1e-6)
    assert torch.allclose(d[0, :3], Vh, atol=1e-6)
    assert float(v[0, 3]) == 0.0 and float(d[0, 3].abs().max()) == 0.0


# --- the halves of each pipeline ------------------------------------------------------------------

@torch.no_grad()  # as inside the pipelines (grad mode can change the CPU attention kernel, hence the bits)
def official_halves(pipe, kind: str, prompt: str):
    """(tokens [T, E], pooled [P]) as each pipeline's official code stacks them, written out."""
    if kind == "sd3":   # sd35_pipeline.py core(): own encode_prompt, negative "", default 256 tokens
        pe, npe, pp, npp = pipe.encode_prompt(prompt, prompt_2=None, prompt_3=None, negative_prompt="",
                                              negative_prompt_2=None, negative_prompt_3=None,
                                              do_classifier_free_guidance=True, device=torch.device("cpu"))
        return torch.cat([pe, npe], 0).flatten(0, 1), torch.cat([pp, npp], 0).flatten()    # [cond ; uncond]
    if kind == "sdxl":  # sdxl_pipeline.py core(): the pipeline's encoding as sample_img.py calls it
        pe, npe, pp, npp = pipe.encode_prompt(prompt=prompt, device=torch.device("cpu"), num_images_per_prompt=1,
                                              do_classifier_free_guidance=True, negative_prompt=None)
        return torch.cat([npe, pe], 0).flatten(0, 1), torch.cat([npp, pp], 0).flatten()    # [uncond ; cond]
    # flux: no official noise model; ours follows sd3's recipe at FLUX's default 512 tokens
    pe, pp, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=512)
    npe, npp, _ = pipe.encode_prompt(prompt="", prompt_2=None, max_sequence_length=512)
    return torch.cat([pe, npe], 0).flatten(0, 1), torch.cat([pp, npp], 0).flatten()


def spy_noise_model(kind: str):
    """A tiny noise model that records the prompt inputs it is handed."""
    T, E, P, C, side = TINY_SHAPES[kind]
    torch.manual_seed(0)
    model = NoiseModel(NoiseModelConfig(
        in_channels=C, num_layers=1, num_heads=2, head_dim=8, patch_size=2, sample_size=side,
        pos_embed_max_size=side // 2, text_dim=E, text_tokens=T, pooled_dim=P, svd_rank=RANK, cond_hidden=8,
        lora_rank=2, num_experts=2, add_cond_residual=True)).eval()
    model.seen = []
    model.register_forward_pre_hook(lambda m, args: m.seen.append([t.clone() for t in args[1:5]]))
    return model


def run_fast(pipe, kind, model, *, negative_prompt=None, max_sequence_length=None, **extra):
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="latent", **extra)
    if max_sequence_length is not None:
        kwargs["max_sequence_length"] = max_sequence_length
    return diffuse(pipe, PROMPTS, settings=GuidanceSettings(mode="fast", cfg_scale=4.0), noise_model=model,
                   negative_prompt=negative_prompt, generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.fixture(scope="module")
def pipes(single_thread):
    pytest.importorskip("diffusers")
    out = {}
    for kind, build in TINY.items():
        out[kind] = build()
        out[kind].set_progress_bar_config(disable=True)
    return out


@pytest.mark.parametrize("kind", ["sd3", "sdxl", "flux"])
def test_noise_model_gets_the_official_halves_in_the_official_order(pipes, kind):
    pipe, model = pipes[kind], spy_noise_model(kind)
    # a user negative prompt and (sd3 / flux) a short max_sequence_length: the summary must not see either
    run_fast(pipe, kind, model, negative_prompt="blue sky", max_sequence_length=None if kind == "sdxl" else 16)
    assert len(model.seen) == 2                                   # one noise-model call per step
    s, v, d, pooled = model.seen[0]
    assert all(torch.equal(a, b) for a, b in zip(model.seen[0], model.seen[1]))   # computed once, reused
    for b, prompt in enumerate(PROMPTS):
        tokens, pool = official_halves(pipe, kind, prompt)
        ours = (s[b], v[b], d[b], pooled[b])
        assert_same_summary(ours, tokens, pool, RANK)
        # the other order is a different input: the rows of U kept follow the token order
        n, p = tokens.shape[0] // 2, pool.shape[0] // 2
        with pytest.raises(AssertionError):
            assert_same_summary(ours, torch.cat([tokens[n:], tokens[:n]]), torch.cat([pool[p:], pool[:p]]), RANK)
        with pytest.raises(AssertionError):  # and not only through pooled
            assert_same_summary(ours, torch.cat([tokens[n:], tokens[:n]]), pool, RANK)


def test_sd3_summary_ignores_negative_prompt_and_max_sequence_length(pipes):
    pipe, seen_tokens = pipes["sd3"], []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen_tokens.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    try:
        runs = []
        for negative, length in ((None, None), ("blurry", 512), ("a dog", 16)):
            model = spy_noise_model("sd3")
            run_fast(pipe, "sd3", model, negative_prompt=negative, max_sequence_length=length)
            runs.append(model.seen[0])
    finally:
        hook.remove()
    assert sorted(set(seen_tokens)) == [77 + 16, 77 + 256, 77 + 512]   # the pipeline did use each length
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
    # and it is the summary of the official 256-token encoding with an empty negative prompt
    tokens, pool = official_halves(pipe, "sd3", PROMPTS[1])
    assert tokens.shape == (2 * (77 + 256), 64)
    assert_same_summary([t[1] for t in runs[0]], tokens, pool, RANK)


def test_summary_rows_follow_images_per_prompt(pipes):
    pipe = pipes["sd3"]
    one = prompt_summary(pipe, PROMPTS, RANK)
    two = prompt_summary(pipe, PROMPTS, RANK, num_images_per_prompt=2)
    assert two.s.shape == (4, RANK, 2 * (77 + 256))
    for field_one, field_two in zip(one, two):                 # prompt-major, as diffusers orders images
        assert torch.equal(field_two, field_one.repeat_interleave(2, dim=0))
    assert not torch.allclose(one.pooled[0], one.pooled[1])
    model = spy_noise_model("sd3")
    run_fast(pipe, "sd3", model, num_images_per_prompt=2)
    assert all(torch.equal(a, b) for a, b in zip(model.seen[0], two))


def test_guided_denoiser_refuses_a_weak_mode_without_the_summary(pipes):
    from llamagen_core2.diffusion import GuidedDenoiser
    from llamagen_core2.diffusion.layouts import layout_for
    from llamagen_core2.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="prompt_summary"):
        GuidedDenoiser(pipes["sd3"].transformer, layout_for("sd3"), GuidanceSettings(mode="slow"),
                       noise_model=spy_noise_model("sd3"))


def test_noise_model_in_bf16_stays_close_to_fp32():
    """The official sampler runs the noise model in bf16; ours follows the loader's dtype (default fp32).
    benchmarks/bench_noise_model_dtype.py measures the gap at the released sizes (docs/diffusion.md)."""
    pytest.importorskip("diffusers")
    model = spy_noise_model("sd3")
    with torch.no_grad():
        for p in model.parameters():     # no zero-initialised path, as in trained weights
            p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(1)
    T, E, P, C, side = TINY_SHAPES["sd3"]
    summary = prompt_features(torch.randn(1, T, E, generator=g), torch.randn(1, P, generator=g), RANK)
    x = torch.randn(1, C, side, side, generator=g)
    with torch.no_grad():
        ref = model(x, *summary, step=0, num_steps=2)
        low = model.to(torch.bfloat16)(x, *summary, step=0, num_steps=2)
    assert low.dtype == torch.float32                 # returned in the caller's dtype
    rel = float((low - ref).norm() / ref.norm())
    assert 0 < rel < 0.03, rel                        # it ran in bf16, and stays within a few percent


def test_sdxl_summary_rows_are_null_space_rows(pipes):
    """SDXL's official summary stacks [zero uncond ; cond]: the rows of U it keeps are rows of zero tokens, so
    they vanish on every column with a non-zero singular value (docs/diffusion.md says what that implies)."""
    pipe = pipes["sdxl"]
    tokens, _ = official_halves(pipe, "sdxl", PROMPTS[0])
    assert float(tokens[:77].abs().max()) == 0.0                 # force_zeros_for_empty_prompt
    k = int(torch.linalg.matrix_rank(tokens.double()))
    s = prompt_summary(pipe, PROMPTS[:1], RANK).s[0]
    assert 0 < k < tokens.shape[0]
    # fp32 SVD rounding: ~1.6e-5 with transformers 5.25's tiny CLIP weights, against components of ~0.07 (mean)
    # to 0.7 on the columns outside the null space
    assert float(s[:, :k].abs().max()) < 1e-4
    assert torch.allclose(s @ s.T, torch.eye(RANK), atol=1e-5)   # still orthonormal rows: all in the null space
