"""diffusers conventions in the adapter: CoRe2Guidance in the tiny *modular* SDXL / SD3 pipelines (cfg == diffusers'
ClassifierFreeGuidance bit for bit; fast runs the cond batch only), a user's callback_on_step_end chained by
diffuse(), GuidanceConfig accepted by diffuse(), the diffusion mode table, LOCAL_RANK -> cuda:N and
`diffuse --model org/repo` from an offline HF cache. CoRe2Guidance subclasses diffusers' BaseGuidance, so it is
imported inside the tests that need it: without diffusers those are skipped, the others still run."""
import numpy as np
import pytest
import torch

from hf_cache import add_directory_to_hf_cache
from llamagen_core2.diffusion import GuidanceSettings, diffuse
from llamagen_core2.diffusion.modes import DIFFUSION_MODES, needs_noise_model, rows_for, step_mode
from llamagen_core2.diffusion.tiny import tiny_sd3, tiny_sdxl
from llamagen_core2.errors import InvalidArgument
from llamagen_core2.guidance.config import GuidanceConfig, Schedule
from test_diffusion import PROMPTS, gen, kw, tiny_noise_model

STEPS = 3


def modular(kind):
    from diffusers.modular_pipelines import StableDiffusion3AutoBlocks, StableDiffusionXLAutoBlocks

    classic = tiny_sd3() if kind == "sd3" else tiny_sdxl()
    pipe = (StableDiffusion3AutoBlocks() if kind == "sd3" else StableDiffusionXLAutoBlocks()).init_pipeline()
    pipe.update_components(**{k: v for k, v in classic.components.items()
                              if k not in ("image_encoder", "feature_extractor")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def modular_pipes(single_thread):
    pytest.importorskip("diffusers")
    return {kind: modular(kind) for kind in ("sdxl", "sd3")}


def run_modular(pipe, kind, guider):
    """Images (np) and the batch size of every denoiser call."""
    pipe.update_components(guider=guider)
    denoiser = pipe.transformer if kind == "sd3" else pipe.unet
    calls = []
    hook = denoiser.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
        (args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))).shape[0]), with_kwargs=True)
    try:
        images = pipe(prompt=PROMPTS, negative_prompt=["", ""], num_inference_steps=STEPS, height=32, width=32,
                      generator=gen(0), output="images", output_type="np",
                      # SD3 at the summary recipe's 256 T5 tokens and negative "": the captured embeddings are then
                      # what the official pipeline hands its noise model (prompt_summary.py)
                      **({"max_sequence_length": 256} if kind == "sd3" else {}))
    finally:
        hook.remove()
    return images, calls


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_core2_guider_cfg_mode_equals_classifier_free_guidance(modular_pipes, kind):
    from diffusers.guiders import ClassifierFreeGuidance

    from llamagen_core2.diffusion import CoRe2Guidance

    pipe = modular_pipes[kind]
    ref, ref_calls = run_modular(pipe, kind, ClassifierFreeGuidance(guidance_scale=4.0))
    ours, calls = run_modular(pipe, kind, CoRe2Guidance(mode="cfg", guidance_scale=4.0))
    assert np.array_equal(ref, ours)  # same formula, same operations: bit for bit
    assert calls == ref_calls == [2] * (2 * STEPS)  # cond batch + uncond batch per step
    other, _ = run_modular(pipe, kind, CoRe2Guidance(mode="cfg", guidance_scale=1.5))
    assert np.abs(other - ours).max() > 1e-3  # the scale is really used


def test_core2_guider_fast_and_slow_in_the_modular_pipeline(modular_pipes):
    from diffusers.guiders import ClassifierFreeGuidance

    from llamagen_core2.diffusion import CoRe2Guidance

    pipe = modular_pipes["sd3"]
    cond_only, cond_calls = run_modular(pipe, "sd3", ClassifierFreeGuidance(guidance_scale=4.0, enabled=False))
    fast, calls = run_modular(pipe, "sd3", CoRe2Guidance(mode="fast", guidance_scale=4.0,
                                                         noise_model=tiny_noise_model("sd3", identity=True)))
    # an identity noise model predicts w = cond, so fast == cond-only sampling, one batch per step
    assert np.abs(fast - cond_only).max() <= 1e-5 and calls == cond_calls == [2] * STEPS
    slow, calls = run_modular(pipe, "sd3", CoRe2Guidance(mode="slow", guidance_scale=4.0, w2s_scale=2.0,
                                                         end_timesteps=1, noise_model=tiny_noise_model("sd3")))
    assert calls == [2, 2, 2, 2]  # W2S (cond + uncond) at step 0, fast afterwards
    assert np.abs(slow - fast).max() > 1e-3
    sdxl_fast, calls = run_modular(modular_pipes["sdxl"], "sdxl", CoRe2Guidance(
        mode="fast", guidance_scale=4.0, noise_model=tiny_noise_model("sdxl")))
    assert calls == [2] * STEPS and np.isfinite(sdxl_fast).all()


def test_core2_guider_refuses_what_a_guider_cannot_do():
    pytest.importorskip("diffusers")
    from llamagen_core2.diffusion import CoRe2Guidance

    with pytest.raises(InvalidArgument, match="diffuse"):
        CoRe2Guidance(mode="zigzag")
    with pytest.raises(InvalidArgument, match="noise_model"):
        CoRe2Guidance(mode="fast")
    with pytest.raises(InvalidArgument, match="mode must be one of"):
        CoRe2Guidance(mode="fastest")


def test_diffusion_modes_come_from_the_ar_table():
    assert [step_mode("slow", i, 2) for i in range(4)] == ["slow", "slow", "fast", "fast"]
    assert [step_mode("z-core2", i, None) for i in range(2)] == ["slow", "slow"]
    assert {m for m in DIFFUSION_MODES if needs_noise_model(m)} == {"fast", "slow", "z-core2"}
    assert {m for m, spec in DIFFUSION_MODES.items() if spec.zigzag} == {"zigzag", "z-core2"}
    assert (rows_for("cfg", 4.0), rows_for("slow", 4.0), rows_for("fast", 4.0), rows_for("cfg", 1.0)) == (2, 2, 1, 1)


def test_diffuse_chains_a_user_callback_on_step_end(single_thread):
    pytest.importorskip("diffusers")
    pipe = tiny_sd3()
    pipe.set_progress_bar_config(disable=True)
    plain = diffuse(pipe, PROMPTS, settings=GuidanceSettings(mode="zigzag", cfg_scale=4.0), generator=gen(0),
                    **kw("sd3")).images
    seen = []

    def watch(p, i, t, callback_kwargs):
        seen.append((i, sorted(callback_kwargs), callback_kwargs["latents"].clone()))
        return {}

    watched = diffuse(pipe, PROMPTS, settings=GuidanceSettings(mode="zigzag", cfg_scale=4.0), generator=gen(0),
                      callback_on_step_end=watch, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
                      **kw("sd3")).images
    assert np.array_equal(plain, watched)  # a callback that changes nothing changes nothing
    assert [s[0] for s in seen] == list(range(kw("sd3")["num_inference_steps"]))
    assert seen[0][1] == ["latents", "prompt_embeds"]

    def zero_last(p, i, t, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if i == STEPS - 1 else {}

    zeroed = diffuse(pipe, PROMPTS, settings=GuidanceSettings(mode="cfg", cfg_scale=4.0), generator=gen(0),
                     callback_on_step_end=zero_last, **{**kw("sd3"), "output_type": "latent"}).images
    assert torch.count_nonzero(zeroed) == 0  # what the user's callback returns reaches the pipeline


def test_diffuse_takes_a_guidance_config(single_thread):
    pytest.importorskip("diffusers")
    pipe = tiny_sd3()
    pipe.set_progress_bar_config(disable=True)
    a = diffuse(pipe, PROMPTS, settings=GuidanceSettings(mode="cfg", cfg_scale=4.0), generator=gen(0), **kw("sd3"))
    b = diffuse(pipe, PROMPTS, settings=GuidanceConfig(cfg_scale=4.0), generator=gen(0), **kw("sd3"))
    assert np.array_equal(a.images, b.images) and a.rows_per_image == b.rows_per_image
    settings = GuidanceSettings.from_guidance(GuidanceConfig(schedule=Schedule("slow", "fast", first_tokens=2),
                                                             cfg_scale=3.5, w2s_scale=1.5), zigzag=True)
    assert (settings.mode, settings.end_timesteps, settings.cfg_scale) == ("z-core2", 2, 3.5)
    with pytest.raises(InvalidArgument, match="top_k"):
        GuidanceSettings.from_guidance(GuidanceConfig(top_k=50))


def test_diffuse_cli_maps_local_rank_to_its_gpu(monkeypatch):
    import argparse

    from llamagen_core2.cli import diffusion as cli

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(str(torch.device("cuda", d))
                                                                         if isinstance(d, int) else str(d)))
    monkeypatch.setenv("LOCAL_RANK", "1")
    for device in ("auto", "cuda"):
        args = argparse.Namespace(device=device, dtype="float32")
        assert str(cli._device_dtype(args)[0]) == "cuda:1"
    assert chosen == ["cuda:1", "cuda:1"]


def test_diffuse_model_accepts_a_repo_id_from_the_offline_cache(tmp_path, monkeypatch, capsys):
    pytest.importorskip("diffusers")
    from test_diffusion import _cli

    saved = tmp_path / "saved"
    tiny_sd3().save_pretrained(saved)
    cache = tmp_path / "hf"
    add_directory_to_hf_cache(cache, "someone/tiny-sd3", saved)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    argv = ["diffuse", "--pipeline", "sd3", "--model", "someone/tiny-sd3", "--prompt", "a red cat", "--steps", "2",
            "--height", "32", "--width", "32", "--max-sequence-length", "16", "--out", str(tmp_path / "img"),
            "--quiet", "--device", "cpu"]
    assert _cli(argv) == 0
    assert '"images": 1' in capsys.readouterr().out.strip().splitlines()[-1]
    from llamagen_core2.errors import CheckpointError

    with pytest.raises(CheckpointError, match="someone/absent.*offline"):
        _cli([*argv[:4], "someone/absent", *argv[5:]])


def test_core2_guider_features_are_the_official_prompt_summary(modular_pipes):
    """With the recipe's encoding (SD3: negative "", 256 T5 tokens) the embeddings the guider captures give exactly
    the summary prompt_summary() builds on the classic pipeline; an explicit prompt_summary= is used as given."""
    from llamagen_core2.diffusion import CoRe2Guidance
    from llamagen_core2.diffusion.prompt_summary import prompt_summary

    model = tiny_noise_model("sd3")
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[1:5]), with_kwargs=True)
    try:
        run_modular(modular_pipes["sd3"], "sd3", CoRe2Guidance(mode="fast", guidance_scale=4.0, noise_model=model))
        official = prompt_summary(tiny_sd3(), PROMPTS, model.config.svd_rank)
        for got, want in zip(seen[0], official):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        seen.clear()
        given = official._replace(pooled=official.pooled * 2)
        run_modular(modular_pipes["sd3"], "sd3", CoRe2Guidance(mode="fast", guidance_scale=4.0, noise_model=model,
                                                               prompt_summary=given))
        assert torch.equal(seen[0][3], given.pooled)
    finally:
        hook.remove()
