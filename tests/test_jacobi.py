"""Jacobi decoding (llamagen_core2/decode/jacobi.py): the tokens of sequential decoding for the same seed, for every
mode and schedule, both engines, batch 1 and 3; forward passes counted independently; window edge cases; bad arguments;
the engine's graph-replay grouping; the Triton step on CPU; the shipped mini world (fewer passes than tokens)."""
import json

import pytest
import torch

from llamagen_core2.core2.weak_model import WeakModel
from llamagen_core2.decode.engine import Engine
from llamagen_core2.decode.generate import generate
from llamagen_core2.decode.jacobi import Segment, mode_segments, window_bounds
from llamagen_core2.errors import InvalidArgument
from llamagen_core2.guidance.config import make_schedule
from llamagen_core2.world.pipeline import WORLD_GUIDANCE, default_checkpoint_dir, load_world
from tiny_models import ScaledCondWeak, captions, tiny_gpt

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py
needs_world = pytest.mark.skipif(not (default_checkpoint_dir() / "world_gpt" / "config.json").is_file(),
                                 reason="mini-world checkpoints not built")


def _weak(model):
    """A real weak model with random weights (its own KV cache: windows must keep it consistent)."""
    weak = WeakModel.for_base(model, "W-1", dim=32, n_head=4, fingerprint=False).eval()
    with torch.no_grad():
        for p in weak.parameters():
            p.normal_(0, 0.05)
    return weak


def _engines(model):
    return {"eager": "eager", "static": Engine(model, bucket=4)}


def _same_as_sequential(model, cond, window=4, engines=("eager", "static"), **kwargs):
    """Jacobi tokens == sequential tokens (eager loop, same seed) on each engine; returns {engine: stats}."""
    reference, seq_stats = generate(model, cond, engine="eager", return_stats=True, **kwargs)
    out = {}
    for name in engines:
        engine = _engines(model)[name]
        tokens, stats = generate(model, cond, engine=engine, decoding="jacobi", jacobi_window=window,
                                 return_stats=True, **kwargs)
        assert torch.equal(tokens, reference), \
            f"{name}: tokens differ at {(tokens != reference).nonzero()[:5].tolist()}"
        B, N = reference.shape
        assert sum(stats["accepted_per_pass"]) == B * N and len(stats["accepted_per_pass"]) == stats["forward_passes"]
        assert max(stats["forward_passes_per_image"]) == stats["forward_passes"] <= N
        assert stats["catchup_calls"] == seq_stats["catchup_calls"]
        out[name] = stats
    assert len({stats["forward_passes"] for stats in out.values()}) == 1  # both engines take the same passes
    return out


@pytest.mark.parametrize("mode", ["cond", "cfg", "fast", "slow"])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_mode_gives_the_sequential_tokens(mode, batch):
    model = tiny_gpt()
    stats = _same_as_sequential(model, torch.arange(batch) + 2, mode=mode, cfg_scale=3.0, w2s_scale=1.5, top_k=0,
                                seed=batch, weak_model=_weak(model))
    s = stats["static"]
    if mode in ("fast", "slow"):  # the weak model runs over every window position
        assert s["weak_steps"] == sum(s["step_rows"]) // (batch * (2 if mode == "slow" else 1))


@pytest.mark.parametrize("schedule", [
    ["cfg"] * 3 + ["fast"] * 5 + ["slow"] * 2 + ["cond"] * 3 + ["cfg"] * 3,  # fast -> slow and cond -> cfg catch-ups
    make_schedule(16, first="slow", then="fast", first_fraction=0.25),
    make_schedule(16, first="fast", then="slow", first_tokens=1),
])
@pytest.mark.parametrize("batch", [1, 3])
def test_schedules_with_catch_up_give_the_sequential_tokens(schedule, batch):
    model = tiny_gpt()
    _same_as_sequential(model, torch.arange(batch) + 4, schedule=schedule, cfg_scale=2.5, w2s_scale=1.3, top_k=20,
                        top_p=0.9, seed=7, weak_model=_weak(model))


def test_cfg_interval_and_compute_and_discard_rows():
    model = tiny_gpt()
    cond = torch.tensor([1, 5])
    _same_as_sequential(model, cond, cfg_scale=3.0, cfg_interval=4, top_k=0, seed=3)
    _same_as_sequential(model, cond, schedule=["cond"] * 5 + ["cfg"] * 11, cfg_scale=3.0, top_k=0, seed=3,
                        compact_rows=False)


@pytest.mark.parametrize("batch", [1, 3])
def test_t2i_prefix_mask(batch):
    model = tiny_gpt("t2i")
    feats, mask = captions(model, batch, [3, 6, 1][:batch])
    _same_as_sequential(model, feats, cond_mask=mask, schedule=["cond"] * 4 + ["cfg"] * 12, cfg_scale=4.0, top_k=0,
                        seed=2)


@pytest.mark.parametrize("window", [1, 2, 15, 16, 100])
def test_window_sizes_including_one_and_larger_than_the_tokens_left(window):
    model = tiny_gpt()
    kw = dict(mode="cfg", cfg_scale=3.0, top_k=0, seed=11)
    stats = _same_as_sequential(model, torch.tensor([3, 8]), window=window, **kw)
    if window == 1:  # one token per pass: exactly sequential decoding, every count the same
        _, seq = generate(model, torch.tensor([3, 8]), engine="eager", return_stats=True, **kw)
        assert stats["eager"] == seq and stats["static"] == seq
        assert seq["forward_passes"] == 16 and seq["forward_passes_per_image"] == [16, 16]


def test_num_tokens_shorter_than_the_image_and_single_token():
    model = tiny_gpt()
    _same_as_sequential(model, torch.tensor([1, 2]), window=8, num_tokens=5, cfg_scale=3.0, top_k=0, seed=4)
    _same_as_sequential(model, torch.tensor([1, 2]), window=8, num_tokens=1, cfg_scale=3.0, top_k=0, seed=4)


def test_forward_passes_are_the_forward_calls_made():
    """The pass counts are checked against the base model's forward calls themselves (not the engine's own count):
    one call per pass plus the catch-up prefill, and rows x predicted positions against the inputs' shapes."""
    model = tiny_gpt()
    T = model.config.cls_token_num
    passes, catch_ups = [], []
    forward = model.forward_hidden

    def spy(x, cache=None, **kw):
        if kw.get("row_start", 0):  # the uncond rows' catch-up prefill
            catch_ups.append(x.shape[0] * x.shape[1])
        else:  # the prefill pass predicts from its last T-1 + W positions' outputs: W of them
            prefill = kw.get("position") is None and kw.get("start", 0) == 0
            passes.append(x.shape[0] * (x.shape[1] - (T - 1 if prefill else 0)))
        return forward(x, cache, **kw)

    model.forward_hidden = spy
    weak = ScaledCondWeak()
    schedule = ["fast"] * 6 + ["cfg"] * 10  # one catch-up before the cfg segment
    _, stats = generate(model, torch.tensor([2, 6, 9]), schedule=schedule, cfg_scale=3.0, top_k=0, seed=0,
                        weak_model=weak, engine=Engine(model), decoding="jacobi", jacobi_window=5, return_stats=True)
    assert len(passes) == stats["forward_passes"] <= 16
    assert passes == stats["step_rows"]
    assert len(catch_ups) == stats["catchup_calls"] == 1 and sum(catch_ups) == stats["catchup_rows"] == 3 * (T + 5)
    assert len(weak.steps) == stats["weak_steps"] and sorted(set(weak.steps)) == list(range(16))


def test_more_passes_per_graph_replay_give_the_same_tokens():
    """Several passes per replay (the host reads the frontier once per replay): the passes after a segment is
    complete are no-ops, counted in forward_passes, and change nothing."""
    model = tiny_gpt()
    kw = dict(schedule=["slow"] * 4 + ["fast"] * 12, cfg_scale=3.0, w2s_scale=1.5, top_k=0, seed=5,
              weak_model=_weak(model), decoding="jacobi", jacobi_window=3, return_stats=True)
    one, s1 = generate(model, torch.tensor([1, 2, 3]), engine=Engine(model, bucket=4), **kw)
    three, s3 = generate(model, torch.tensor([1, 2, 3]), engine=Engine(model, bucket=4, passes_per_graph=3), **kw)
    assert torch.equal(one, three)
    assert s3["forward_passes"] >= s1["forward_passes"]
    assert s3["forward_passes_per_image"] == s1["forward_passes_per_image"]
    assert [a for a in s3["accepted_per_pass"] if a] == [a for a in s1["accepted_per_pass"] if a]


def test_engine_reused_between_sequential_and_jacobi_requests():
    model = tiny_gpt()
    engine = Engine(model, bucket=4)
    kw = dict(mode="slow", cfg_scale=3.0, top_k=0, seed=1, weak_model=_weak(model))
    small = generate(model, torch.tensor([1]), engine="eager", **kw)
    big = generate(model, torch.tensor([1, 2, 3]), engine="eager", **kw)
    assert torch.equal(generate(model, torch.tensor([1, 2, 3]), engine=engine, decoding="jacobi", **kw), big)
    assert torch.equal(generate(model, torch.tensor([1]), engine=engine, **kw), small)
    assert torch.equal(generate(model, torch.tensor([1]), engine=engine, decoding="jacobi", jacobi_window=7, **kw),
                       small)



def test_windows_sample_with_the_requests_filter_flags(monkeypatch):
    """Every window is sampled with the request's (top_k_on, top_p_on), read once on the host, as the sequential
    steps are: an unfiltered request writes no logits row to scratch. One engine serves requests with other filters
    in turn (the flags are also part of the window graphs' key) and each gets the sequential tokens."""
    from llamagen_core2.decode import jacobi

    seen = []
    real = jacobi.guided_sample
    monkeypatch.setattr(jacobi, "guided_sample", lambda *a, **k: (seen.append(k["filters"]), real(*a, **k))[1])
    model = tiny_gpt()
    engine = Engine(model, bucket=4)
    for top_k, top_p, expected in ((0, 1.0, (False, False)), (20, 1.0, (True, False)), (0, 0.9, (False, True))):
        kw = dict(mode="cfg", cfg_scale=3.0, top_k=top_k, top_p=top_p, seed=3)
        reference = generate(model, torch.tensor([1, 2]), engine="eager", **kw)
        for name, chosen in (("eager", "eager"), ("static", engine)):
            seen.clear()
            tokens = generate(model, torch.tensor([1, 2]), engine=chosen, decoding="jacobi", jacobi_window=4, **kw)
            assert torch.equal(tokens, reference), name
            assert seen and set(seen) == {expected}, (name, top_k, top_p, set(seen))

@pytest.mark.parametrize("kwargs, match", [
    (dict(decoding="parallel"), "decoding must be one of"),
    (dict(decoding="jacobi", jacobi_window=0), "jacobi_window must be"),
    (dict(decoding="jacobi", jacobi_window=2.5), "jacobi_window must be"),
    (dict(decoding="jacobi", jacobi_window="16"), "jacobi_window must be"),
    (dict(decoding="jacobi", jacobi_window=True), "jacobi_window must be"),
    (dict(decoding="jacobi", jacobi_guess="random"), "jacobi_guess must be one of"),
    (dict(decoding="jacobi", on_step=print), "on_step records sequential"),
])
def test_bad_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        generate(tiny_gpt(), torch.tensor([1]), seed=0, **kwargs)


def test_a_base_model_that_produces_nan_is_reported():
    model = tiny_gpt()
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[0, 0] = float("inf")
    for engine in ("eager", Engine(model)):
        with pytest.raises(FloatingPointError, match="non-finite"):
            generate(model, torch.tensor([1, 2]), cfg_scale=3.0, seed=0, engine=engine, decoding="jacobi")


def test_segments_and_window_bounds():
    assert mode_segments(["cfg", "cfg", "fast", "cfg"]) == [Segment(0, 2, "cfg"), Segment(2, 3, "fast"),
                                                           Segment(3, 4, "cfg")]
    assert window_bounds(Segment(0, 16, "cfg"), 4) == (4, 1, 12)  # token 0 comes from the prefill pass
    assert window_bounds(Segment(0, 16, "cfg"), 100) == (15, 1, 1)
    assert window_bounds(Segment(5, 8, "fast"), 16) == (3, 5, 5)
    assert window_bounds(Segment(0, 1, "cfg"), 16)[0] == 0  # covered by the prefill pass


@pytest.mark.parametrize("guess", ["left", "above", "zero"])
def test_every_first_guess_rule_gives_the_sequential_tokens(guess):
    model = tiny_gpt()
    reference = generate(model, torch.tensor([1, 2]), cfg_scale=3.0, top_k=0, seed=8, engine="eager")
    for engine in ("eager", Engine(model)):
        tokens = generate(model, torch.tensor([1, 2]), cfg_scale=3.0, top_k=0, seed=8, engine=engine,
                          decoding="jacobi", jacobi_window=6, jacobi_guess=guess)
        assert torch.equal(tokens, reference)


@pytest.mark.parametrize("kernels_env", ["auto", "triton"])
def test_triton_window_step_on_cpu_gives_the_sequential_tokens(kernels_env, monkeypatch):
    """engine="static" with the Triton backend (kernels interpreted on CPU): RoPE + KV write over a window at
    device positions, the fused sampler per window position, device acceptance. LLAMAGEN_CORE2_KERNELS=triton
    also forces the fused decode-layer kernels over the windows (add+RMSNorm+QKV+RoPE+KV write at the window's
    positions, skinny GEMMs, add+RMSNorm+W1|W3+SwiGLU; attention through SDPA), base and weak trunks."""
    kernels = pytest.importorskip("llamagen_core2.kernels.decode_attention")
    if not kernels.INTERPRETED:
        pytest.skip("on CUDA the gpu tests cover the compiled kernels")
    monkeypatch.setenv("LLAMAGEN_CORE2_KERNELS", kernels_env)
    model = tiny_gpt()
    kw = dict(schedule=["fast"] * 5 + ["slow"] * 11, weak_model=_weak(model), cfg_scale=4.0, w2s_scale=1.5,
              top_k=20, top_p=0.9, seed=2)
    reference = generate(model, torch.tensor([1, 2]), engine="eager", **kw)
    engine = Engine(model, backend="triton")
    tokens, stats = generate(model, torch.tensor([1, 2]), engine=engine, decoding="jacobi", jacobi_window=4,
                             return_stats=True, **kw)
    assert torch.equal(tokens, reference) and stats["forward_passes"] <= 16
    widths = {shape.width for shape in engine.request.decode_ops}
    assert widths == {4} and all(ops.key == (kernels_env == "triton",) * 4
                                 for ops in engine.request.decode_ops.values())


# ---------------------------------------------------------------------- the shipped mini world
@pytest.fixture(scope="module")
def world():
    return load_world()


@needs_world
@pytest.mark.parametrize("mode", ["cfg", "fast"])
def test_mini_world_takes_fewer_passes_than_tokens(world, mode):
    """A trained model: tokens settle before their prefix is final, so Jacobi needs fewer passes than the 36 tokens
    (measured tables: docs/decoding.md); the tokens are the sequential ones."""
    cond = torch.tensor([0, 5, 13])
    kw = dict(guidance=WORLD_GUIDANCE.replace(mode=mode), seed=0, weak_model=world.weak)
    reference = generate(world.gpt, cond, engine="eager", **kw)
    for engine in ("eager", Engine(world.gpt)):
        tokens, stats = generate(world.gpt, cond, engine=engine, decoding="jacobi", jacobi_window=16,
                                 return_stats=True, **kw)
        assert torch.equal(tokens, reference)
        assert stats["forward_passes"] < 36 and stats["forward_passes_mean"] < 36
        assert max(stats["accepted_per_pass"]) > 3  # some pass finalised more than one token per image


def test_acceptance_rule_on_hand_made_windows():
    """Token start+k is final iff every token it read (start..start+k-1) was final or guessed right; final tokens
    never change; new samples past the frontier become the next guesses."""
    from llamagen_core2.decode.jacobi import WindowState

    state = WindowState.allocate(3, 8, grid=4, device="cpu").view(3, 8)
    state.tokens.copy_(torch.tensor([[5, 1, 2, 3, 4, 0, 0, 0],    # image 0: frontier 1, guesses 1 2 3 4
                                     [5, 6, 7, 3, 9, 0, 0, 0],    # image 1: frontier 3 (ahead)
                                     [5, 1, 2, 3, 4, 0, 0, 0]]))  # image 2: frontier 1
    state.frontier.copy_(torch.tensor([1, 3, 1]))
    new = torch.tensor([[1, 2, 9, 4],   # guesses 1, 2 right, 3 wrong -> tokens 1, 2, 3 final (3 read only 1, 2)
                        [8, 8, 3, 7],   # tokens 1, 2 already final (kept), guess 3 right -> 1..4 final
                        [7, 2, 3, 4]])  # guess 1 wrong -> only token 1 final; 2.. become guesses
    state.accept(new, torch.tensor([1]))
    assert state.frontier.tolist() == [4, 5, 2]
    assert state.tokens[:, :5].tolist() == [[5, 1, 2, 9, 4], [5, 6, 7, 3, 7], [5, 7, 2, 3, 4]]
    assert state.accepted[0].item() == 3 + 2 + 1 and state.passes.item() == 1
    state.fill_guesses(torch.tensor([5]), "left")
    assert state.tokens[:, 5:].tolist() == [[4, 4, 4], [7, 7, 7], [4, 4, 4]]
    state.fill_guesses(torch.tensor([5]), "above")  # token i guesses token i - 4 (grid width 4)
    assert state.tokens[:, 5:].tolist() == [[1, 2, 9], [6, 7, 3], [7, 2, 3]]


# ---------------------------------------------------------------------- pipeline, sample (resume), CLI
@needs_world
def test_pipeline_jacobi_gives_the_sequential_images_in_fewer_passes(world):
    pipe = world.pipeline()
    kw = dict(class_labels=[1, 6, 12], num_images_per_prompt=2, seed=3, batch_size=4, output_type="np",
              progress=False)
    seq = pipe(**kw)
    jac = pipe(**kw, decoding="jacobi", jacobi_window=16)
    assert torch.equal(seq.tokens, jac.tokens) and (seq.images == jac.images).all()
    assert seq.stats["forward_passes"] == 2 * 36 and seq.stats["forward_passes_per_image"] == 36
    assert jac.stats["forward_passes"] < 2 * 36 and jac.stats["forward_passes_per_image"] < 36
    with pytest.raises(InvalidArgument, match="jacobi_window"):
        pipe(**kw, decoding="jacobi", jacobi_window=0)


def test_sample_resumes_across_decodings_and_the_cli_flags(tmp_path, capsys):
    """`sample` with --decoding jacobi writes the images of sequential decoding; the decoding is not a setting, so
    a run resumes with the other one and rewrites a missing image bit for bit. `generate` takes the flags too."""
    from llamagen_core2 import cli
    from llamagen_core2.cli import core2 as core2_cli
    from tiny_models import save_tiny_world

    _, _, gpt_dir, vq_dir = save_tiny_world(tmp_path)
    base = ["--gpt", str(gpt_dir), "--vq", str(vq_dir), "--classes", "0-2", "--per-class", "2", "--batch-size", "4",
            "--seed", "5", "--top-k", "0", "--device", "cpu", "--quiet"]
    seq = core2_cli.main(["sample", *base, "--out", str(tmp_path / "seq")])
    jac = core2_cli.main(["sample", *base, "--out", str(tmp_path / "jac"), "--decoding", "jacobi",
                          "--jacobi-window", "16"])
    assert seq["images_written"] == jac["images_written"] == 6 and jac["forward_passes"] <= seq["forward_passes"]
    for i in range(6):
        name = f"images/{i:06d}.png"
        assert (tmp_path / "seq" / name).read_bytes() == (tmp_path / "jac" / name).read_bytes()
    (tmp_path / "jac" / "images" / "000002.png").unlink()
    resumed = core2_cli.main(["sample", *base, "--out", str(tmp_path / "jac")])  # sequential resumes the jacobi run
    assert resumed["images_written"] == 4  # the group holding the missing image
    assert (tmp_path / "jac" / "images/000002.png").read_bytes() == (tmp_path / "seq" / "images/000002.png").read_bytes()

    assert cli.main(["generate", *base, "--out", str(tmp_path / "gen"), "--decoding", "jacobi",
                     "--jacobi-window", "4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["decoding"] == "jacobi" and summary["images_generated"] == 6
    assert summary["forward_passes_per_image"] <= 16
    # generate resumes too: the decoding is not in its settings.json, so the sequential rerun finds every image
    assert cli.main(["generate", *base, "--out", str(tmp_path / "gen")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images_generated"] == 0
    for bad, match in ((["--decoding", "parallel"], "invalid choice"), (["--jacobi-window", "0"], "integer >= 1")):
        with pytest.raises(SystemExit):
            cli.main(["generate", *base, "--out", str(tmp_path / "bad"), *bad])
        assert match in capsys.readouterr().err


@needs_world
def test_bench_jacobi_quick_run_reports_identical_tokens(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_jacobi.py"
    spec = importlib.util.spec_from_file_location("bench_jacobi", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    summary = bench.main(["--quick"])
    assert summary["all_identical"] and summary["tokens_per_image"] == 36
    row = summary["rows"][0]
    assert row["batch_passes"] < 36 and row["alone_mean"] <= row["passes_per_image"] <= row["batch_passes"]
    assert "| cfg | 16 |" in capsys.readouterr().out
