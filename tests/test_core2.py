"""CoRe^2 end to end on tiny CPU models: weak model, Collect (resume, rank split), Reflect (learns, resume),
Refine row counts and catch-up, base-mismatch refusal, save/load, and the `sample` subcommand."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llamagen_core2.cli import core2 as core2_cli
from llamagen_core2.config import VQConfig
from llamagen_core2.core2.collect import COLLECT_GUIDANCE, collect, load_collected, storage_per_image
from llamagen_core2.core2.reflect import reflect
from llamagen_core2.core2.sample import build_schedule
from llamagen_core2.core2.weak_model import WeakModel
from llamagen_core2.decode.generate import generate
from llamagen_core2.encoders.vq import VQModel
from llamagen_core2.errors import CheckpointError, InvalidArgument
from llamagen_core2.guidance.config import make_schedule
from llamagen_core2.io.shards import ShardReader
from tiny_models import captions, tiny_gpt

WEAK_TINY = dict(dim=32, n_head=4, multiple_of=32)
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Collect 60 CFG images (10 classes x 6) from a tiny random base, Reflect a W-2-shaped weak model on them."""
    root = tmp_path_factory.mktemp("core2")
    gpt = tiny_gpt()
    gpt_dir = root / "gpt"
    gpt.save_pretrained(gpt_dir)
    shards = root / "shards"
    summary = collect(gpt, list(range(10)), shards, per_condition=6, batch_size=12,
                      guidance=COLLECT_GUIDANCE.replace(cfg_scale=4.0), seed=0,
                      progress=False)
    out = root / "weak"
    result = reflect(gpt, shards, out, preset="W-2", weak_overrides=WEAK_TINY, steps=80, batch_size=8, lr=3e-3,
                     warmup=10, holdout=0.2, eval_every=40, checkpoint_every=40, progress=False)
    return dict(root=root, gpt=gpt, gpt_dir=gpt_dir, shards=shards, out=out, result=result, summary=summary)


# ---------------------------------------------------------------------- weak model
@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_weak_cached_steps_match_teacher_forced_and_untrained_is_cond(model_type):
    gpt = tiny_gpt(model_type)
    if model_type == "c2i":
        cond, mask = torch.tensor([1, 7]), None
    else:
        cond, mask = captions(gpt, 2, [2, 6])
    weak = WeakModel.for_base(gpt, "W-2", **WEAK_TINY)
    records = []
    generate(gpt, cond, cond_mask=mask, mode="fast", weak_model=weak, top_k=0, seed=0, on_step=records.append)
    # Untrained (residual, zero-initialised output) = exactly the conditional output.
    with torch.no_grad():
        cond_logits = torch.stack([gpt.head(r.hidden_cond) for r in records], 1)
    weak_logits = torch.stack([r.weak_logits for r in records], 1)
    assert torch.equal(weak_logits, cond_logits)
    # With a non-trivial output the cached decode equals the teacher-forced forward.
    torch.manual_seed(3)
    torch.nn.init.normal_(weak.proj_out.weight, std=0.5)
    torch.nn.init.normal_(weak.skip_scale, std=0.3)
    records = []
    generate(gpt, cond, cond_mask=mask, mode="fast", weak_model=weak, top_k=0, seed=0, on_step=records.append)
    h_c = torch.stack([r.hidden_cond for r in records], 1)
    with torch.no_grad():
        reference = gpt.head(weak(cond, h_c, cond_mask=mask))
    got = torch.stack([r.weak_logits for r in records], 1)
    assert (got - cond_logits).abs().max() > 1.0  # the check below compares non-trivial predictions
    assert (got - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_weak_model_for_another_base_is_refused(tmp_path):
    gpt = tiny_gpt()
    weak = WeakModel.for_base(gpt, "W-2", cfg_scale=4.0, **WEAK_TINY)
    weak.save_pretrained(tmp_path / "weak")
    wider = tiny_gpt(dim=96, n_head=4)
    with pytest.raises(CheckpointError, match=r"dim: weak model built for 64, base has 96"):
        WeakModel.from_pretrained(tmp_path / "weak", wider)
    with pytest.raises(CheckpointError, match=r"vocab_size: weak model built for 97, base has 50"):
        generate(tiny_gpt(vocab_size=50), torch.tensor([1]), mode="fast", weak_model=weak)
    with pytest.raises(CheckpointError, match=r"cls_token_num.*model_type|model_type.*cls_token_num"):
        weak.check_compatible(tiny_gpt("t2i"))
    # Same shapes, other weights: refused by the weights fingerprint unless explicitly allowed.
    other = tiny_gpt(seed=5)
    with pytest.raises(CheckpointError, match="weights fingerprint"):
        generate(other, torch.tensor([1]), mode="fast", weak_model=weak)
    weak.require_same_weights = False
    assert generate(other, torch.tensor([1]), mode="fast", weak_model=weak, seed=0).shape == (1, 16)


# ---------------------------------------------------------------------- Collect -> Reflect
def test_collect_reflect_learns_the_cfg_distribution(trained):
    heldout = trained["result"]["heldout"]
    ratio = heldout["kl"] / heldout["baseline_kl"]
    print(f"held-out KL(cfg||weak) {heldout['kl']:.4f} vs KL(cfg||cond) {heldout['baseline_kl']:.4f}: "
          f"ratio {ratio:.3f}; MSE {heldout['mse']:.3f} vs {heldout['baseline_mse']:.3f}")
    assert heldout["baseline_kl"] > 0.5  # CFG at scale 4 really changes the distribution
    assert ratio < 0.5
    saved = json.loads((trained["out"] / "eval.json").read_text())
    assert saved["heldout"]["kl"] == pytest.approx(heldout["kl"]) and saved["heldout_images"] == 12
    log = [json.loads(line) for line in (trained["out"] / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [40, 80] and all("heldout_mse" in r for r in log)


def test_collected_shards_match_a_cfg_run_and_storage(trained):
    meta, data = load_collected(trained["shards"])
    gpt = trained["gpt"]
    assert meta["cfg_scale"] == 4.0 and meta["num_images"] == 60 and meta["base"]["dim"] == 64
    assert data["hidden_cond"].shape == (60, 16, 64) and data["hidden_cond"].dtype == torch.float16
    assert torch.equal(data["sample_index"], torch.arange(60))
    assert torch.equal(data["labels"], torch.arange(60) // 6)
    # The stored CFG hidden states reproduce the base model's CFG logits on the stored tokens.
    labels, tokens = data["labels"][:12], data["tokens"][:12]
    with torch.no_grad():
        c = gpt.logits(labels, tokens)
        u = gpt.logits(gpt.null_condition(12, labels), tokens)
    h_c, h_u = data["hidden_cond"][:12].float(), data["hidden_uncond"][:12].float()
    cfg_from_store = gpt.head(h_u + 4.0 * (h_c - h_u))
    assert (cfg_from_store - (u + 4.0 * (c - u))).abs().max() < 0.05 * (u + 4.0 * (c - u)).abs().max()
    assert trained["summary"]["bytes_per_image"] == storage_per_image(gpt.config) == 2 * 16 * 64 * 2 + 8 * 16 + 24


def test_weak_save_load_roundtrip_records_the_base(trained):
    gpt, out = trained["gpt"], trained["out"]
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "weak" and config["cfg_scale"] == 4.0
    assert {k: config["base"][k] for k in ("dim", "vocab_size", "cls_token_num", "model_type", "preset")} == \
        dict(dim=64, vocab_size=97, cls_token_num=1, model_type="c2i", preset="GPT-B")
    assert config["base_fingerprint"].startswith("w-") and config["config"]["n_layer"] == 2
    weak = WeakModel.from_pretrained(out, gpt)
    again = WeakModel.from_pretrained(out, gpt)
    t1 = generate(gpt, torch.tensor([3, 4]), mode="fast", weak_model=weak, seed=5)
    t2 = generate(gpt, torch.tensor([3, 4]), mode="fast", weak_model=again, seed=5)
    assert torch.equal(t1, t2)
    assert not any(k.startswith("layers.") and "attention.wqkv" in k and v.shape[1] == 64
                   for k, v in weak.state_dict().items())  # the base is never part of the weak state dict


def test_reflect_resume_after_interruption_matches_unbroken_run(trained, tmp_path, monkeypatch):
    from llamagen_core2.core2 import reflect as reflect_module

    gpt, shards = trained["gpt"], trained["shards"]
    kw = dict(preset="W-1", weak_overrides=WEAK_TINY, steps=12, batch_size=8, holdout=0.2, eval_every=100,
              checkpoint_every=6, progress=False)
    unbroken = reflect(gpt, shards, tmp_path / "a", **kw)
    save = reflect_module._save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt("simulated kill after the first checkpoint")

    monkeypatch.setattr(reflect_module, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        reflect(gpt, shards, tmp_path / "b", **kw)
    monkeypatch.setattr(reflect_module, "_save_checkpoint", save)
    assert json.loads((tmp_path / "b" / "checkpoints" / "latest.json").read_text())["step"] == 6
    resumed = reflect(gpt, shards, tmp_path / "b", **kw)
    assert resumed["heldout"]["kl"] == pytest.approx(unbroken["heldout"]["kl"], rel=1e-5)
    a = WeakModel.from_pretrained(tmp_path / "a").state_dict()
    b = WeakModel.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_reflect_log_has_no_repeated_step_after_a_kill_between_an_eval_line_and_the_next_checkpoint(
        trained, tmp_path, monkeypatch):
    """Issue 19: killed after logging step 8 but before its checkpoint, the resumed run (from step 4) logged steps
    6 and 8 a second time."""
    from llamagen_core2.core2 import reflect as reflect_module

    gpt, shards = trained["gpt"], trained["shards"]
    kw = dict(preset="W-1", weak_overrides=WEAK_TINY, steps=12, batch_size=8, holdout=0.2, eval_every=2,
              checkpoint_every=4, progress=False)

    def log(out):
        return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]

    reflect(gpt, shards, tmp_path / "a", **kw)
    save = reflect_module._save_checkpoint

    def die_before_checkpoint_8(out_dir, weak, optimizer, step, *args, **kwargs):
        if step == 8:
            raise KeyboardInterrupt("simulated kill after the eval line of step 8, before its checkpoint")
        return save(out_dir, weak, optimizer, step, *args, **kwargs)

    monkeypatch.setattr(reflect_module, "_save_checkpoint", die_before_checkpoint_8)
    with pytest.raises(KeyboardInterrupt):
        reflect(gpt, shards, tmp_path / "b", **kw)
    monkeypatch.setattr(reflect_module, "_save_checkpoint", save)
    assert [r["step"] for r in log(tmp_path / "b")] == [2, 4, 6, 8]  # logged past the last checkpoint (4)
    with open(tmp_path / "b" / "train_log.jsonl", "a") as f:
        f.write('{"step": 10, "train_kl": 0.')  # and a line torn by the kill
    reflect(gpt, shards, tmp_path / "b", **kw)
    unbroken, resumed = log(tmp_path / "a"), log(tmp_path / "b")
    assert [r["step"] for r in resumed] == [r["step"] for r in unbroken] == [2, 4, 6, 8, 10, 12]
    for a, b in zip(unbroken, resumed):
        assert b == pytest.approx(a, rel=1e-4)


# ---------------------------------------------------------------------- Refine: rows and catch-up
def test_row_counts_with_the_real_weak_model(trained):
    gpt = trained["gpt"]
    weak = WeakModel.from_pretrained(trained["out"], gpt)
    B, N, K, T = 3, 16, 5, 1
    cond = torch.tensor([1, 2, 3])
    counted = []
    forward = gpt.forward_hidden

    def counting(x, cache=None, **kw):
        counted.append(x.shape[0] * x.shape[1])
        return forward(x, cache, **kw)

    gpt.forward_hidden = counting
    try:
        kw = dict(cfg_scale=4.0, top_k=0, seed=0, weak_model=weak, return_stats=True)
        runs = {
            "fast": (dict(mode="fast"), B * N, 0),
            "cfg": (dict(mode="cfg"), 2 * B * N, 0),
            "slow": (dict(mode="slow"), 2 * B * N, 0),
            "slow-then-fast": (dict(schedule=make_schedule(N, first="slow", then="fast", first_tokens=K)),
                               2 * B * K + B * (N - K), 0),
            # Fast first: the uncond rows skip the prefix and tokens 0..K-2, then one catch-up prefill.
            "fast-then-slow": (dict(schedule=make_schedule(N, first="fast", then="slow", first_tokens=K)),
                               B * K + 2 * B * (N - K) + B * (T + K - 1), B * (T + K - 1)),
        }
        for name, (args, rows, catchup) in runs.items():
            counted.clear()
            _, stats = generate(gpt, cond, **args, **kw)
            assert stats["base_rows"] == rows and sum(counted) == rows, name
            assert stats["catchup_rows"] == catchup, name
            assert stats["weak_steps"] == (N if name != "cfg" else 0), name
    finally:
        del gpt.forward_hidden


def test_fast_then_cfg_catch_up_gives_the_logits_of_a_full_run(trained):
    gpt = trained["gpt"]
    weak = WeakModel.from_pretrained(trained["out"], gpt)
    cond, K = torch.tensor([5, 9]), 6
    records = []
    tokens = generate(gpt, cond, schedule=["fast"] * K + ["cfg"] * (16 - K), weak_model=weak, cfg_scale=4.0, top_k=0,
                      seed=1, on_step=records.append)
    # Reference: uncond rows computed all along (teacher-forced full recompute on the same tokens).
    with torch.no_grad():
        c = gpt.logits(cond, tokens)
        u = gpt.logits(gpt.null_condition(2, cond), tokens)
    for r in records[K:K + 2]:
        assert (r.mixed_logits - (u[:, r.index] + 4.0 * (c[:, r.index] - u[:, r.index]))).abs().max() <= 1e-4


def test_build_schedule_fractions_both_directions():
    assert build_schedule(16, slow_first=0.25) == ["slow"] * 4 + ["fast"] * 12
    assert build_schedule(16, fast_first=0.25) == ["fast"] * 4 + ["slow"] * 12
    assert build_schedule(16, slow_first_tokens=3) == ["slow"] * 3 + ["fast"] * 13
    assert build_schedule(16, mode="slow") is None
    with pytest.raises(InvalidArgument, match="at most one"):
        build_schedule(16, slow_first=0.5, fast_first=0.5)
    with pytest.raises(InvalidArgument, match=r"first_fraction must be in \[0, 1\]"):
        build_schedule(16, slow_first=1.5)


# ---------------------------------------------------------------------- Collect: kill/resume, ranks, CLI
def _shard_contents(directory):
    return {sid: {k: v.clone() for k, v in t.items()} for sid, t in ShardReader(directory)}


def _assert_same_samples(a, b):
    assert sorted(a) == sorted(b)
    for sid in a:
        assert sorted(a[sid]) == sorted(b[sid])
        for name in a[sid]:
            assert torch.equal(a[sid][name], b[sid][name]), (sid, name)


# --device cpu: these runs are compared bit for bit with CPU runs in other processes (GPU runs: test_gpu.py).
COLLECT_ARGS = ["--device", "cpu", "--classes", "0-4", "--per-class", "4", "--batch-size", "2", "--cfg-scale", "3",
                "--seed", "7", "--quiet"]


def test_collect_sigkill_resume_and_rank_split_give_the_same_samples(trained, tmp_path):
    gpt_dir = trained["gpt_dir"]
    reference = tmp_path / "reference"
    core2_cli.main(["collect", "--gpt", str(gpt_dir), "--out", str(reference), *COLLECT_ARGS])
    expected = _shard_contents(reference)
    assert len(expected) == 10  # 20 images in groups of 2

    # A separate process collects the same work slowly; SIGKILL it after its first shard lands.
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, time, torch
        torch.set_num_threads(1)
        from llamagen_core2.decode.model import GPT
        from llamagen_core2.core2.collect import COLLECT_GUIDANCE, collect
        gpt = GPT.from_pretrained({str(gpt_dir)!r})
        collect(gpt, list(range(5)), {str(killed)!r}, per_condition=4, batch_size=2,
                guidance=COLLECT_GUIDANCE.replace(cfg_scale=3.0), seed=7,
                base_checkpoint=os.path.abspath({str(gpt_dir)!r}), progress=False,
                on_group=lambda g: time.sleep(0.5))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.time() + 60
        while not list(killed.glob("rank*.safetensors")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    partial = _shard_contents(killed)
    assert 0 < len(partial) < 10, f"the kill should land mid-run, found {len(partial)} of 10 groups"
    core2_cli.main(["collect", "--gpt", str(gpt_dir), "--out", str(killed), *COLLECT_ARGS])
    _assert_same_samples(_shard_contents(killed), expected)

    # Two ranks (as under torchrun with WORLD_SIZE=2) take disjoint halves and together give the same set.
    split = tmp_path / "split"
    for rank in (0, 1):
        os.environ.update(RANK=str(rank), WORLD_SIZE="2")
        try:
            core2_cli.main(["collect", "--gpt", str(gpt_dir), "--out", str(split), *COLLECT_ARGS])
        finally:
            del os.environ["RANK"], os.environ["WORLD_SIZE"]
    assert {p.name[:9] for p in split.glob("rank*.safetensors")} == {"rank00000", "rank00001"}
    _assert_same_samples(_shard_contents(split), expected)


def test_collect_refuses_to_resume_with_other_settings_and_bad_arguments(trained, tmp_path, capsys):
    from llamagen_core2.cli import main as cli_main

    gpt = trained["gpt"]
    # Through the package CLI: exit status 0, storage per image printed; a bad class id is a one-line error.
    argv = ["collect", "--gpt", str(trained["gpt_dir"]), "--classes", "1,2", "--out", str(tmp_path / "cli"), "--quiet",
            "--device", "cpu"]
    assert cli_main(argv) == 0
    assert "KiB per image" in capsys.readouterr().out
    assert cli_main([*argv[:4], "3-12", *argv[5:]]) == 2
    assert "class ids must be in [0, 9]" in capsys.readouterr().err
    collect(gpt, [1, 2], tmp_path, per_condition=1, batch_size=2,
            guidance=COLLECT_GUIDANCE.replace(cfg_scale=3.0), progress=False)
    with pytest.raises(InvalidArgument, match="cfg_scale"):
        collect(gpt, [1, 2], tmp_path, per_condition=1, batch_size=2,
                guidance=COLLECT_GUIDANCE.replace(cfg_scale=5.0), progress=False)
    with pytest.raises(InvalidArgument, match="cfg_scale must be > 1"):
        collect(gpt, [1], tmp_path / "x", guidance=COLLECT_GUIDANCE.replace(cfg_scale=1.0))
    with pytest.raises(InvalidArgument, match=r"class ids must be in \[0, 9\]"):
        collect(gpt, [3, 12], tmp_path / "y", guidance=COLLECT_GUIDANCE.replace(cfg_scale=2.0))


def test_reflect_refuses_shards_from_another_base(trained, tmp_path):
    with pytest.raises(CheckpointError, match="different base model: dim"):
        reflect(tiny_gpt(dim=96, n_head=4), trained["shards"], tmp_path, steps=1, progress=False)
    with pytest.raises(CheckpointError, match="fingerprint"):
        reflect(tiny_gpt(seed=3), trained["shards"], tmp_path, steps=1, progress=False)


# ---------------------------------------------------------------------- sample subcommand
def _tiny_vq(codebook_size=97) -> VQModel:
    torch.manual_seed(0)
    config = VQConfig(ch=16, z_channels=16, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, codebook_size=codebook_size,
                      codebook_embed_dim=8, norm_groups=8)
    return VQModel(config).eval()


def test_sample_subcommand_writes_pngs_and_npz_and_resumes(trained, tmp_path):
    vq_dir = tmp_path / "vq"
    _tiny_vq().save_pretrained(vq_dir)
    out = tmp_path / "samples"
    argv = ["sample", "--device", "cpu", "--gpt", str(trained["gpt_dir"]), "--vq", str(vq_dir),
            "--weak", str(trained["out"]),
            "--classes", "0-2", "--per-class", "2", "--batch-size", "2", "--mode", "slow", "--w2s-scale", "1.5",
            "--slow-first", "0.25", "--out", str(out), "--quiet"]
    first = core2_cli.main(argv)
    assert first["images_written"] == 6 and first["groups_run"] == 3
    # base rows: slow for 4 of 16 tokens (2B rows), fast for the rest (B rows), per group of B=2
    assert first["base_rows"] == 3 * (2 * 2 * 4 + 2 * 12)
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(6)]
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (6, 64, 64, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    before = (out / "images" / "000003.png").read_bytes()
    (out / "images" / "000003.png").unlink()
    (out / "samples.npz").unlink()
    again = core2_cli.main(argv)
    assert again["images_written"] == 2 and again["groups_run"] == 1  # only the group with the missing image
    assert (out / "images" / "000003.png").read_bytes() == before
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], npz["arr_0"])
    with pytest.raises(SystemExit):
        core2_cli.main([*argv[:-3], "--w2s-scale", "2.5", "--out", str(out), "--quiet"])


def test_sample_image_n_does_not_depend_on_the_batch_size(trained, tmp_path):
    """The seed rule of `sample`: image n uses seeding.image_key(--seed, n), so other batch sizes give the same PNGs."""
    vq_dir = tmp_path / "vq"
    _tiny_vq().save_pretrained(vq_dir)
    runs = []
    for batch in ("2", "3"):
        out = tmp_path / f"b{batch}"
        core2_cli.main(["sample", "--gpt", str(trained["gpt_dir"]), "--vq", str(vq_dir), "--classes", "0-2",
                        "--per-class", "2", "--batch-size", batch, "--seed", "9", "--out", str(out), "--quiet"])
        runs.append(out)
    for i in range(6):
        assert (runs[0] / "images" / f"{i:06d}.png").read_bytes() == (runs[1] / "images" / f"{i:06d}.png").read_bytes()
    # so a run interrupted at one batch size resumes at another (e.g. after an out-of-memory refusal)
    (runs[0] / "images" / "000004.png").unlink()
    resumed = core2_cli.main(["sample", "--gpt", str(trained["gpt_dir"]), "--vq", str(vq_dir), "--classes", "0-2",
                              "--per-class", "2", "--batch-size", "1", "--seed", "9", "--out", str(runs[0]), "--quiet"])
    assert resumed["images_written"] == 1
    assert (runs[0] / "images" / "000004.png").read_bytes() == (runs[1] / "images" / "000004.png").read_bytes()


def test_torchrun_two_process_collect_equals_one_process(trained, tmp_path):
    """A real 2-process torchrun (each rank takes g % 2 == rank) writes the same samples as 1 process."""
    gpt_dir = trained["gpt_dir"]
    args = ["collect", "--device", "cpu", "--gpt", str(gpt_dir), "--classes", "0-3", "--per-class", "2",
            "--batch-size", "2", "--cfg-scale", "3", "--seed", "11", "--quiet"]
    one = tmp_path / "one"
    core2_cli.main([*args, "--out", str(one)])
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "llamagen_core2.cli.core2", *args, "--out", str(two)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert {p.name[:9] for p in two.glob("rank*.safetensors")} == {"rank00000", "rank00001"}
    _assert_same_samples(_shard_contents(two), _shard_contents(one))


def test_t2i_collect_reflect_and_fast_sampling(tmp_path):
    gpt = tiny_gpt("t2i")
    feats, mask = captions(gpt, 4, [2, 3, 5, 6])
    collect(gpt, feats, tmp_path / "shards", caption_mask=mask, condition_names=["a", "b", "c", "d"],
            per_condition=3, batch_size=6, guidance=COLLECT_GUIDANCE.replace(cfg_scale=5.0), progress=False)
    meta, data = load_collected(tmp_path / "shards")
    assert meta["conditions"] == ["a", "b", "c", "d"] and data["captions"].shape == (12, 6, 24)
    assert torch.equal(data["caption_mask"], mask.repeat_interleave(3, 0))
    result = reflect(gpt, tmp_path / "shards", tmp_path / "weak", preset="W-1", weak_overrides=WEAK_TINY, steps=30,
                     batch_size=4, lr=3e-3, warmup=5, holdout=0.25, progress=False)
    assert result["heldout"]["kl"] < result["heldout"]["baseline_kl"]
    weak = WeakModel.from_pretrained(tmp_path / "weak", gpt)
    tokens, stats = generate(gpt, feats[:2], cond_mask=mask[:2], mode="fast", weak_model=weak, seed=0,
                             return_stats=True)
    assert tokens.shape == (2, 16) and stats["base_rows"] == 2 * 16
