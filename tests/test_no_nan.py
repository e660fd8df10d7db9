"""No NaN is ever persisted or sampled silently: shards, checkpoints, JSON, Collect, Reflect (AR and diffusion)."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llamagen_core2.core2.collect import COLLECT_GUIDANCE, collect, load_collected
from llamagen_core2.core2.reflect import reflect
from llamagen_core2.errors import NonFiniteError
from llamagen_core2.io.checkpoint import save_pretrained
from llamagen_core2.io.files import atomic_write_json
from llamagen_core2.io.shards import ShardWriter
from tiny_models import tiny_gpt

pytestmark = pytest.mark.usefixtures("single_thread")
WEAK_TINY = dict(dim=32, n_head=4, multiple_of=32)


def _all_written_values_finite(directory):
    """Every safetensors tensor and every JSON number under `directory` is finite."""
    for path in directory.rglob("*"):
        if path.suffix == ".safetensors":
            for name, t in load_file(str(path)).items():
                assert not t.is_floating_point() or torch.isfinite(t).all(), (path, name)
        elif path.suffix in (".json", ".jsonl"):
            texts = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
            for text in texts:
                json.loads(text, parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("nan")
    gpt = tiny_gpt()
    collect(gpt, list(range(10)), root / "shards", per_condition=2, batch_size=10,
            guidance=COLLECT_GUIDANCE.replace(cfg_scale=4.0), progress=False)
    return gpt, root / "shards"


# ---------------------------------------------------------------------- writers refuse NaN
def test_shard_writer_refuses_nan_and_inf(tmp_path):
    w = ShardWriter(tmp_path, {}, rank=0, world_size=1)
    with pytest.raises(NonFiniteError, match=r"sample 'a' not written: x holds 1 NaN/inf"):
        w.add("a", {"x": torch.tensor([0.0, float("nan")]), "ids": torch.tensor([1])})
    with pytest.raises(NonFiniteError, match="y holds 2 NaN/inf"):
        w.add("a", {"y": torch.tensor([float("inf"), -float("inf")], dtype=torch.float16)})
    w.flush()
    assert not list(tmp_path.glob("rank*"))


def test_save_pretrained_refuses_nan_weights_and_writes_nothing(tmp_path):
    with pytest.raises(NonFiniteError, match=r"refusing to write .*: w holds 1 NaN/inf"):
        save_pretrained(tmp_path / "m", {"w": torch.tensor([1.0, float("nan")]), "b": torch.zeros(2)}, {"kind": "x"})
    assert not (tmp_path / "m").exists()


def test_json_writer_refuses_nan_naming_the_key(tmp_path):
    with pytest.raises(NonFiniteError, match=r"heldout.kl is NaN/inf"):
        atomic_write_json(tmp_path / "eval.json", {"heldout": {"kl": float("nan"), "mse": 1.0}})
    with pytest.raises(NonFiniteError, match=r"rows\[1\] is NaN/inf"):
        atomic_write_json(tmp_path / "x.json", {"rows": [1.0, float("inf")]})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- Collect
def test_collect_refuses_hidden_states_beyond_the_store_dtype(tmp_path):
    gpt = tiny_gpt()
    with torch.no_grad():
        gpt.norm.weight.fill_(1e6)  # finite in fp32, inf once stored as float16
    with pytest.raises(NonFiniteError, match=r"group g000000 not written .*float16.*hidden_cond holds"):
        collect(gpt, [1, 2], tmp_path, per_condition=1, batch_size=2,
                guidance=COLLECT_GUIDANCE.replace(cfg_scale=3.0), progress=False)
    assert not list(tmp_path.glob("rank*"))
    collect(gpt, [1, 2], tmp_path, per_condition=1, batch_size=2,
            guidance=COLLECT_GUIDANCE.replace(cfg_scale=3.0), store_dtype="float32",
            progress=False)  # the suggested fix works in the same directory
    _all_written_values_finite(tmp_path)


def test_collect_refuses_a_base_model_that_produces_nan(tmp_path):
    gpt = tiny_gpt()
    with torch.no_grad():
        gpt.layers[0].attention.wo.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        collect(gpt, [1, 2], tmp_path, per_condition=1, batch_size=2,
                guidance=COLLECT_GUIDANCE.replace(cfg_scale=3.0), progress=False)
    assert not list(tmp_path.glob("rank*"))


# ---------------------------------------------------------------------- Reflect
def test_reflect_refuses_nan_in_its_input_shards_naming_the_file(shards, tmp_path):
    gpt, src = shards
    bad = tmp_path / "shards"
    bad.mkdir()
    for p in src.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    shard = sorted(bad.glob("rank*.safetensors"))[1]
    tensors = load_file(str(shard))
    key = next(k for k in tensors if k.endswith("hidden_uncond"))
    tensors[key][0, 0, 0] = float("nan")
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, str(shard), metadata=meta)
    with pytest.raises(NonFiniteError, match=rf"{shard.name} \(group g000001.*hidden_uncond holds 1 NaN/inf"):
        load_collected(bad)
    out = tmp_path / "weak"
    with pytest.raises(NonFiniteError):
        reflect(gpt, bad, out, preset="W-1", weak_overrides=WEAK_TINY, steps=2, holdout=0.2, progress=False)
    assert not out.exists()


def test_reflect_stops_before_writing_a_diverged_model(shards, tmp_path):
    gpt, src = shards
    out = tmp_path / "weak"
    # A loss weight far too large overflows the loss: the run must stop, not write NaN weights / KL.
    with pytest.raises(NonFiniteError, match=r"loss became NaN/inf by step 2"):
        reflect(gpt, src, out, preset="W-1", weak_overrides=WEAK_TINY, steps=4, batch_size=4, warmup=1,
                mse_weight=1e308, holdout=0.2, eval_every=2, checkpoint_every=2, progress=False)
    assert not (out / "model.safetensors").exists() and not (out / "eval.json").exists()
    if out.exists():
        _all_written_values_finite(out)


def test_reflect_checkpoints_written_before_divergence_stay_finite(shards, tmp_path, monkeypatch):
    from llamagen_core2.core2 import reflect as reflect_module

    gpt, src = shards
    out = tmp_path / "weak"
    real = reflect_module.guidance_losses
    calls = {"n": 0}

    def diverging(gpt, pred, target):  # the training loss is finite for 2 steps, then NaN
        kl, mse = real(gpt, pred, target)
        if pred.requires_grad:  # a training step, not an evaluation
            calls["n"] += 1
            if calls["n"] > 2:
                kl = kl * float("nan")
        return kl, mse

    monkeypatch.setattr(reflect_module, "guidance_losses", diverging)
    with pytest.raises(NonFiniteError):
        reflect(gpt, src, out, preset="W-1", weak_overrides=WEAK_TINY, steps=6, batch_size=4, warmup=1,
                holdout=0.2, eval_every=2, checkpoint_every=2, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000002"]
    _all_written_values_finite(out)


# ---------------------------------------------------------------------- diffusion Reflect
def _diffusion_shards(directory, nan=False):
    """Two tiny trajectories in the diffuse-collect layout, written as a ShardWriter would (NaN forced in)."""
    ShardWriter(directory, {"kind": "sd3", "cfg_scale": 5.0}, rank=0, world_size=1)
    tensors = {}
    for k in range(2):
        cond = torch.randn(3, 4, 8, 8)
        tensors.update({f"{k}/cond": cond, f"{k}/cfg": 1.5 * cond, f"{k}/step": torch.arange(3),
                        f"{k}/s": torch.randn(2, 6), f"{k}/v": torch.rand(2), f"{k}/d": torch.randn(2, 16),
                        f"{k}/pooled": torch.randn(8)})
    if nan:
        tensors["1/cfg"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(directory / "rank00000-000000.safetensors"),
              metadata={"sample_ids": json.dumps(["p0000000-s0", "p0000001-s0"])})


def test_diffusion_reflect_refuses_nan_inputs_and_diverged_training(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from llamagen_core2.diffusion.reflect import train_noise_model

    _diffusion_shards(tmp_path / "bad", nan=True)
    with pytest.raises(NonFiniteError, match=r"rank00000-000000.safetensors \(trajectory p0000001-s0.*cfg holds 1"):
        train_noise_model(tmp_path / "bad", iters=1, holdout=0.0)
    _diffusion_shards(tmp_path / "ok")
    model, report = train_noise_model(tmp_path / "ok", iters=2, holdout=0.5)
    assert np.isfinite(report.final_train_mse) and report.heldout_mse is not None
    real_mse = torch.nn.functional.mse_loss
    monkeypatch.setattr(torch.nn.functional, "mse_loss", lambda a, b: real_mse(a, b) * float("nan"))
    with pytest.raises(NonFiniteError, match="loss became NaN/inf"):
        train_noise_model(tmp_path / "ok", iters=3, holdout=0.0)


def test_a_weak_or_noise_model_with_nan_weights_is_refused_at_load(tmp_path):
    from llamagen_core2.core2.weak_model import WeakModel
    from llamagen_core2.diffusion.noise_model import NoiseModel, NoiseModelConfig
    from llamagen_core2.diffusion.noise_model_io import load_noise_model
    from llamagen_core2.errors import CheckpointError

    gpt = tiny_gpt()
    weak = WeakModel.for_base(gpt, "W-1", **WEAK_TINY)
    weak.save_pretrained(tmp_path / "weak")
    tensors = load_file(str(tmp_path / "weak" / "model.safetensors"))
    tensors["proj_out.weight"][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "weak" / "model.safetensors"))  # as an older, unchecked writer would
    with pytest.raises(CheckpointError, match=r"weak model: proj_out.weight holds 1 NaN/inf"):
        WeakModel.from_pretrained(tmp_path / "weak", gpt)
    pytest.importorskip("diffusers")  # the weak-model half above needs none
    config = NoiseModelConfig(in_channels=4, num_layers=1, num_heads=2, head_dim=8, sample_size=8,
                              pos_embed_max_size=4, text_dim=16, text_tokens=6, pooled_dim=8, svd_rank=2,
                              cond_hidden=8, lora_rank=2, num_experts=2)
    state = {k: v.clone() for k, v in NoiseModel(config).state_dict().items()}
    state[next(k for k, v in state.items() if v.is_floating_point())].fill_(float("inf"))
    save_file(state, str(tmp_path / "noise.safetensors"))
    with pytest.raises(CheckpointError, match="noise model: .* holds .* NaN/inf"):
        load_noise_model(tmp_path / "noise.safetensors", config=config)


def test_diffuse_never_writes_nan_images(tmp_path, monkeypatch, capsys):
    pytest.importorskip("diffusers")
    from llamagen_core2.cli import main
    from llamagen_core2.diffusion import runner

    real = runner.diffuse

    def nan_images(*args, **kwargs):
        res = real(*args, **kwargs)
        res.images = res.images * float("nan")
        return res

    monkeypatch.setattr(runner, "diffuse", nan_images)
    rc = main(["diffuse", "--pipeline", "sd3", "--model", "tiny", "--prompt", "x", "--steps", "1", "--height", "32",
               "--width", "32", "--max-sequence-length", "8", "--device", "cpu", "--quiet", "--out",
               str(tmp_path / "img")])
    err = capsys.readouterr().err.strip().splitlines()  # (diffusers' own start-up chatter may come first)
    assert rc == 2 and err[-1].startswith("llamagen-core2 diffuse: error: batch 0 produced NaN/inf images")
    assert not any("Traceback" in line for line in err)
    assert not list((tmp_path / "img").glob("*.png"))
