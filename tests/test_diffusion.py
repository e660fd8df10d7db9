"""Diffusion adapter on tiny random diffusers pipelines (CPU, no downloads).

Shows: cfg mode == the unmodified pipeline (SDXL, SD3, FLUX true CFG); NFE per mode counted on the
real denoiser; slow with w2s 1 == cfg; fast with an identity noise model == cond-only sampling;
zigzag steps match the schedulers; the released noise-model layout loads (bad keys named);
Collect -> Reflect beats the cond baseline on held-out prompts.
"""
import random

import numpy as np
import pytest
import torch

from llamagen_core2.diffusion import (GuidanceSettings, NoiseModel, NoiseModelConfig, diffuse, expected_rows_per_image,
                                      expert_index, load_noise_model, save_noise_model)
from llamagen_core2.diffusion.noise_model import noise_model_preset
from llamagen_core2.diffusion.noise_model_io import expected_shapes
from llamagen_core2.diffusion.tiny import TINY, WORDS, tiny_sdxl
from llamagen_core2.errors import CheckpointError, InvalidArgument

STEPS = 3
PROMPTS = ["a red cat on the sea", "a small house in the city"]
# noise-model inputs of the tiny pipelines: (summary tokens of both halves, token width, pooled width, channels,
# latent side); the summary has its own fixed encoding length (prompt_summary.py: SD3 77 + 256, FLUX 512)
FEATURES = {"sdxl": (2 * 77, 64, 64, 4, 16), "sd3": (2 * (77 + 256), 64, 128, 4, 16), "flux": (2 * 512, 32, 64, 16, 8)}


@pytest.fixture(scope="module")
def pipes():
    pytest.importorskip("diffusers")
    out = {}
    for kind, build in TINY.items():
        pipe = build()
        pipe.set_progress_bar_config(disable=True)
        out[kind] = pipe
    out["sdxl-ddim"] = tiny_sdxl(scheduler="ddim")
    out["sdxl-ddim"].set_progress_bar_config(disable=True)
    return out


def kw(kind):
    extra = {} if kind.startswith("sdxl") else {"max_sequence_length": 16}
    return dict(num_inference_steps=STEPS, height=32, width=32, output_type="np", **extra)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tiny_noise_model(kind, *, identity=False, seed=0):
    T, E, P, C, side = FEATURES[kind.split("-")[0]]
    torch.manual_seed(seed)
    cfg = NoiseModelConfig(in_channels=C, num_layers=1, num_heads=2, head_dim=8, patch_size=2, sample_size=side,
                           pos_embed_max_size=side // 2, text_dim=E, text_tokens=T, pooled_dim=P, svd_rank=4,
                           cond_hidden=8, lora_rank=2, num_experts=4, add_cond_residual=True)
    model = NoiseModel(cfg).eval()
    if not identity:  # make w != cond
        with torch.no_grad():
            model.proj_out.linear.weight.normal_(std=0.05)
    return model


def run(pipe, kind, settings, model=None, seed=0, **extra):
    kwargs = kw(kind)
    kwargs.update(extra)
    neg = "blue sky" if kind == "flux" else None
    return diffuse(pipe, PROMPTS, settings=settings, noise_model=model, generator=gen(seed), negative_prompt=neg,
                   **kwargs)


# --- parity -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sdxl", "sd3", "flux"])
def test_cfg_mode_matches_unmodified_pipeline(pipes, kind):
    pipe, s = pipes[kind], 4.5
    if kind == "flux":  # true CFG: two transformer passes per step inside FluxPipeline
        ref = pipe(prompt=PROMPTS, negative_prompt=["blue sky"] * 2, true_cfg_scale=s, guidance_scale=3.5,
                   generator=gen(), **kw(kind)).images
    else:
        ref = pipe(prompt=PROMPTS, guidance_scale=s, generator=gen(), **kw(kind)).images
    res = run(pipe, kind, GuidanceSettings(mode="cfg", cfg_scale=s))
    assert ref.shape == res.images.shape == (2, 32, 32, 3)
    assert np.abs(ref - res.images).max() <= 1e-5
    assert res.rows_per_image == 2 * STEPS
    # the pipeline must actually be sensitive to guidance, or parity would prove nothing
    other = run(pipe, kind, GuidanceSettings(mode="cfg", cfg_scale=1.5))
    assert np.abs(other.images - res.images).max() > 1e-3


# --- NFE ------------------------------------------------------------------------------------

def first_layer(pipe, kind):
    return pipe.unet.conv_in if kind.startswith("sdxl") else (
        pipe.transformer.pos_embed if kind == "sd3" else pipe.transformer.x_embedder)


NFE_CASES = [  # (mode, extra settings, rows per image for 3 steps, worked out by hand)
    ("cfg", {}, 6),
    ("fast", {}, 3),
    ("slow", {}, 6),
    ("slow", {"end_timesteps": 1}, 2 + 1 + 1),
    ("zigzag", {}, 6 + 2 * (1 + 2)),                       # 2 zigzag steps, cond-only inversion
    ("zigzag", {"inv_cfg": 2.0, "zigzag_steps": 1}, 6 + (2 + 2)),
    ("z-core2", {"end_timesteps": 1}, 4 + (1 + 2) + (1 + 1)),
]


# Schedules are covered on sd3; the sdxl / flux layouts by cfg, fast, zigzag and z-core2 (keeps CI time down).
NFE_RUNS = [(kind, *case) for kind in ("sd3", "sdxl-ddim", "flux") for case in NFE_CASES
            if kind == "sd3" or not (case[0] == "slow" or case[1].get("inv_cfg"))]


@pytest.mark.parametrize("kind,mode,extra,rows", NFE_RUNS, ids=[f"{m}-{e}-{k}" for k, m, e, _ in NFE_RUNS])
def test_nfe_rows_per_mode(pipes, kind, mode, extra, rows):
    pipe = pipes[kind]
    seen = []
    hook = first_layer(pipe, kind).register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        settings = GuidanceSettings(mode=mode, cfg_scale=4.0, w2s_scale=2.0, **extra)
        res = run(pipe, kind, settings, model=tiny_noise_model(kind))
    finally:
        hook.remove()
    assert np.isfinite(res.images).all()
    assert res.rows_per_image == rows == expected_rows_per_image(settings, STEPS)
    assert sum(seen) == rows * len(PROMPTS)           # counted on the real denoiser
    if mode == "fast":
        assert seen == [len(PROMPTS)] * STEPS         # uncond rows never computed


def test_slow_with_w2s_one_equals_cfg(pipes):
    cfg = run(pipes["sd3"], "sd3", GuidanceSettings(mode="cfg", cfg_scale=4.0)).images
    slow = run(pipes["sd3"], "sd3", GuidanceSettings(mode="slow", cfg_scale=4.0, w2s_scale=1.0),
               model=tiny_noise_model("sd3")).images
    assert np.abs(cfg - slow).max() <= 1e-5
    slow2 = run(pipes["sd3"], "sd3", GuidanceSettings(mode="slow", cfg_scale=4.0, w2s_scale=2.0),
                model=tiny_noise_model("sd3")).images
    assert np.abs(cfg - slow2).max() > 1e-3


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_fast_with_identity_noise_model_is_cond_only_sampling(pipes, kind):
    """A fresh add_cond_residual model predicts w = cond, so fast == the pipeline without CFG."""
    pipe = pipes[kind]
    ref = pipe(prompt=PROMPTS, guidance_scale=1.0, generator=gen(), **kw(kind)).images
    res = run(pipe, kind, GuidanceSettings(mode="fast", cfg_scale=4.0), model=tiny_noise_model(kind, identity=True))
    assert np.abs(ref - res.images).max() <= 1e-5


def test_zigzag_changes_the_image_and_needs_supported_scheduler(pipes):
    base = run(pipes["sd3"], "sd3", GuidanceSettings(mode="cfg", cfg_scale=4.0)).images
    zz = run(pipes["sd3"], "sd3", GuidanceSettings(mode="zigzag", cfg_scale=4.0)).images
    assert np.abs(base - zz).max() > 1e-3
    with pytest.raises(InvalidArgument, match="DDIMScheduler"):
        run(pipes["sdxl"], "sdxl", GuidanceSettings(mode="zigzag", cfg_scale=4.0))


# --- scheduler math used by zigzag --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sdxl-ddim", "sd3"])
def test_zigzag_stepper_matches_scheduler_and_inverts(pipes, kind):
    from llamagen_core2.diffusion.zigzag import stepper_for

    sched = pipes[kind].scheduler
    sched.set_timesteps(5)
    st = stepper_for(sched)
    g = gen(1)
    x, pred = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for j in range(4):
        sched._step_index = j if hasattr(sched, "_step_index") else None
        ref = sched.step(pred, sched.timesteps[j], x, return_dict=False)[0]
        ours = st.step(x, pred, j)
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0), j
        assert torch.allclose(st.invert(ours, pred, j), x, atol=1e-5, rtol=0)


# --- noise model ----------------------------------------------------------------------------------

def test_expert_routing():
    assert [expert_index(i, 4, 8) for i in range(4)] == [0, 2, 4, 6]
    assert [expert_index(i, 8, 4) for i in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    released = [expert_index(i, 50, 28) for i in range(50)]
    assert released[0] == 0 and released[-1] == 27 and sorted(released) == released and len(set(released)) == 28
    with pytest.raises(InvalidArgument, match="step"):
        expert_index(4, 4, 8)


def test_presets_have_the_released_shapes():
    pytest.importorskip("diffusers")
    sd35, sdxl = expected_shapes(noise_model_preset("sd35")), expected_shapes(noise_model_preset("sdxl"))
    assert sd35["trans_linear.linear.weight"] == (1536, 666 + 1 + 4096)
    assert sd35["skip_connection.linear.weight"] == (2 * 16, 667)
    assert sd35["transformer_blocks.7.attn1.to_q.lora.27.A"] == (1536, 64)
    assert sd35["transformer_blocks.0.ff.net.0.proj.linear.weight"] == (2 * 2 * 1536, 1536)
    assert sd35["pos_embed.pos_embed"] == (1, 192 * 192, 1536)
    assert "transformer_blocks.8.norm1.weight" not in sd35 and "pool_prompt_linear.linear.weight" not in sd35
    assert sdxl["pool_prompt_linear.linear.weight"] == (2048, 2560)
    assert sdxl["skip_connection.linear.weight"] == (8, 155)
    assert sdxl["pre8_linear.0.linear.weight"] == (128, 2048)
    assert sdxl["proj_out.lora.49.B"] == (48, 2 * 2 * 4)
    assert "transformer_blocks.4.norm1.weight" not in sdxl


class _OfficialLoRA(torch.nn.Module):
    """Test oracle: the released LoRA wrapper layout (linear + lora[k].A/B), written from the facts."""

    def __init__(self, linear, rank, n):
        super().__init__()
        self.linear = linear
        self.lora = torch.nn.ModuleList(torch.nn.Module() for _ in range(n))
        for m in self.lora:
            m.A = torch.nn.Parameter(torch.randn(linear.in_features, rank) * 0.1)
            m.B = torch.nn.Parameter(torch.randn(rank, linear.out_features) * 0.1)
        self.idx = 0

    def forward(self, x):
        return self.linear(x) + x @ self.lora[self.idx].A @ self.lora[self.idx].B


def _official_oracle(cfg: NoiseModelConfig):
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.embeddings import PatchEmbed
    from diffusers.models.normalization import AdaLayerNormContinuous

    nn, W, E = torch.nn, cfg.width, cfg.text_dim
    m = nn.Module()
    m.pos_embed = PatchEmbed(height=cfg.sample_size, width=cfg.sample_size, patch_size=cfg.patch_size,
                             in_channels=cfg.in_channels, embed_dim=W, pos_embed_max_size=cfg.pos_embed_max_size)
    m.transformer_blocks = nn.ModuleList(BasicTransformerBlock(W, cfg.num_heads, cfg.head_dim, ff_inner_dim=2 * W)
                                         for _ in range(cfg.num_layers))
    m.norm_out = AdaLayerNormContinuous(W, W, elementwise_affine=False, eps=1e-6)
    m.proj_out = nn.Linear(W, cfg.patch_size ** 2 * cfg.in_channels)
    for name in ("pre8_linear", "pre16_linear", "pre24_linear", "pre8_linear2", "pre16_linear2", "pre24_linear2",
                 "last_linear"):
        setattr(m, name, nn.Sequential(nn.Linear(E, cfg.cond_hidden), nn.SiLU(), nn.LayerNorm(cfg.cond_hidden),
                                       nn.Linear(cfg.cond_hidden, W)))
    m.skip_connection2 = nn.Linear(E, 1, bias=False)
    m.skip_connection = nn.Linear(cfg.text_tokens + 1, 2 * cfg.in_channels, bias=False)
    m.trans_linear = nn.Linear(cfg.text_tokens + 1 + E, W, bias=False)
    m.pool_prompt_linear = nn.Linear(cfg.pooled_dim, E, bias=False)

    def wrap(mod):
        for n, ch in list(mod.named_children()):
            if isinstance(ch, nn.Linear):
                setattr(mod, n, _OfficialLoRA(ch, cfg.lora_rank, cfg.num_experts))
            else:
                wrap(ch)
    wrap(m)
    for p in m.parameters():  # non-trivial values everywhere (the released init zeroes several)
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def _oracle_forward(m, cfg, x, s, v, d, pooled, expert):
    for mod in m.modules():
        if isinstance(mod, _OfficialLoRA):
            mod.idx = expert
    emb = torch.cat([s.permute(0, 2, 1) @ torch.diag_embed(v) @ d, m.pool_prompt_linear(pooled[:, None])], 1)
    sc = [getattr(m, f"pre{k}_linear2")(emb).mean(1) for k in (8, 16, 24)]
    sh = [getattr(m, f"pre{k}_linear")(emb).mean(1) for k in (8, 16, 24)]
    tr = m.trans_linear(torch.cat([s, v[..., None], d], 2)).mean(1)
    a, b = m.skip_connection(m.skip_connection2(emb).permute(0, 2, 1)).permute(0, 2, 1).chunk(2, 1)
    h = m.pos_embed(x) * (1 + sc[0][:, None] + tr[:, None]) + sh[0][:, None]
    for j, blk in enumerate(m.transformer_blocks):
        h = blk(h) * (1 + sc[1 + j // 4][:, None] + tr[:, None]) + sh[1 + j // 4][:, None]
    h = m.proj_out(m.norm_out(h, m.last_linear(emb).mean(1)))
    p, C, H, W = cfg.patch_size, cfg.in_channels, x.shape[2], x.shape[3]
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(-1, H // p, W // p, p, p, C)).reshape(-1, C, H, W)
    return h + x * a[..., None] + b[..., None]


TINY_OFFICIAL = NoiseModelConfig(in_channels=4, num_layers=5, num_heads=2, head_dim=8, patch_size=2, sample_size=8,
                                 pos_embed_max_size=6, text_dim=12, text_tokens=10, pooled_dim=20, svd_rank=3,
                                 cond_hidden=8, lora_rank=2, num_experts=3, base="tiny")


def test_official_layout_pth_loads_and_matches_the_released_forward(tmp_path):
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    oracle = _official_oracle(TINY_OFFICIAL)
    path = tmp_path / "tiny_noise_model.pth"
    torch.save(oracle.state_dict(), path)
    model = load_noise_model(path, config=TINY_OFFICIAL)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in oracle.state_dict().items()}
    g = gen(3)
    x, s, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 10, generator=g), torch.rand(2, 3, generator=g)
    d, pooled = torch.randn(2, 3, 12, generator=g), torch.randn(2, 20, generator=g)
    for step in (0, 3):  # N=4, E=3: experts 0 and 2
        with torch.no_grad():
            ours = model(x, s, v, d, pooled, step=step, num_steps=4)
            ref = _oracle_forward(oracle, TINY_OFFICIAL, x, s, v, d, pooled, expert_index(step, 4, 3))
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    # our safetensors format round-trips
    save_noise_model(model, tmp_path / "ours")
    again = load_noise_model(tmp_path / "ours")
    with torch.no_grad():
        a, b = again(x, s, v, d, pooled, step=1, num_steps=4), model(x, s, v, d, pooled, step=1, num_steps=4)
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in again.state_dict().items())
    assert torch.allclose(a, b, atol=1e-6, rtol=0)  # same weights; CPU matmul order may differ by an ulp


def test_bad_noise_model_checkpoints_are_reported_by_name(tmp_path):
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    state = _official_oracle(TINY_OFFICIAL).state_dict()
    renamed = dict(state)
    renamed["proj_out.linear.weigth"] = renamed.pop("proj_out.linear.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError, match=r"proj_out\.linear\.weight.*proj_out\.linear\.weigth"):
        load_noise_model(tmp_path / "renamed.pth", config=TINY_OFFICIAL)
    reshaped = dict(state)
    reshaped["transformer_blocks.0.attn1.to_q.lora.2.A"] = torch.zeros(16, 5)
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.attn1\.to_q\.lora\.2\.A: checkpoint \[16, 5\]"):
        load_noise_model(tmp_path / "reshaped.pth", config=TINY_OFFICIAL)
    torch.save({"w": torch.zeros(1), "obj": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        load_noise_model(tmp_path / "evil.pth", config=TINY_OFFICIAL)
    with pytest.raises(InvalidArgument, match="preset"):
        load_noise_model(tmp_path / "reshaped.pth")


class _Evil:
    pass


def test_bad_guidance_inputs(pipes):
    with pytest.raises(InvalidArgument, match="noise model"):
        run(pipes["sd3"], "sd3", GuidanceSettings(mode="fast"))
    with pytest.raises(InvalidArgument, match="cfg_scale"):
        run(pipes["sd3"], "sd3", GuidanceSettings(mode="cfg", cfg_scale=float("nan")))
    with pytest.raises(InvalidArgument, match="mode"):
        run(pipes["sd3"], "sd3", GuidanceSettings(mode="wrong"))
    with pytest.raises(InvalidArgument, match="prompt tokens"):  # a model built for another base
        run(pipes["sd3"], "sd3", GuidanceSettings(mode="fast"), model=tiny_noise_model("sdxl"))


# --- Collect -> Reflect -------------------------------------------------------------------------------

def test_collect_then_reflect_beats_cond_baseline_on_heldout_prompts(pipes, tmp_path):
    from llamagen_core2.diffusion.collect import collect_diffusion
    from llamagen_core2.diffusion.reflect import train_noise_model
    from llamagen_core2.io.shards import ShardReader

    rnd = random.Random(0)
    prompts = [" ".join(rnd.choice(WORDS) for _ in range(5)) for _ in range(12)]
    common = dict(cfg_scale=5.0, num_inference_steps=STEPS, batch_size=6, svd_rank=8, height=32, width=32,
                  max_sequence_length=16, progress=False, samples_per_shard=4)
    assert collect_diffusion(pipes["sd3"], prompts[:6], tmp_path, **common) == 6
    assert collect_diffusion(pipes["sd3"], prompts, tmp_path, **common) == 6   # resumes: only the new six
    reader = ShardReader(tmp_path)
    assert len(reader) == 12 and len(set(reader.sample_ids())) == 12
    _, first = next(iter(reader))
    assert first["cond"].shape == (STEPS, 4, 16, 16) and first["s"].shape == (8, 2 * (77 + 256))
    model, report = train_noise_model(tmp_path, iters=60, batch_size=8, lr=3e-3, holdout=0.25)
    assert report.heldout_trajectories == 3 and report.num_steps == STEPS
    assert report.heldout_mse < 0.8 * report.heldout_cond_mse, report
    # the trained model drives the fast mode of the same pipeline
    res = run(pipes["sd3"], "sd3", GuidanceSettings(mode="fast", cfg_scale=5.0), model=model)
    assert np.isfinite(res.images).all() and res.rows_per_image == STEPS


# --- CLI ------------------------------------------------------------------------------------------------

def _cli(argv):
    import argparse

    from llamagen_core2.cli import diffusion as cli

    parser = argparse.ArgumentParser()
    cli.add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_diffuse_writes_pngs(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from PIL import Image

    argv = ["diffuse", "--pipeline", "sd3", "--model", "tiny", "--prompt", "a red cat", "--prompt", "a dog",
            "--steps", "2", "--height", "32", "--width", "32", "--max-sequence-length", "16", "--batch-size", "2",
            "--out", str(tmp_path / "img"), "--quiet"]
    assert _cli(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"images": 2' in line and '"denoiser_rows_per_image": 4.0' in line
    assert Image.open(tmp_path / "img" / "00001.png").size == (32, 32)
    with pytest.raises(InvalidArgument, match="--model"):
        _cli(["diffuse", "--pipeline", "sdxl", "--model", str(tmp_path / "nope"), "--prompt", "x"])
