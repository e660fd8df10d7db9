"""The throughput benchmarks run end to end on CPU (tiny models): every engine, the CSV rows and the JSON line."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_generate_runs_ours_and_the_baseline_side_by_side(capsys, single_thread):
    bench = _load("bench_generate")
    bench.main(["--preset", "tiny", "--batch", "2", "--tokens", "256", "--modes", "cfg", "fast", "--engines", "ours",
                "baseline", "--device", "cpu", "--warmup-tokens", "2", "--copy-mb", "8"])
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    rows = {(r["engine"], r["mode"]): r for r in summary["rows"]}
    assert set(rows) == {("ours", "cfg"), ("ours", "fast"), ("baseline", "cfg"), ("baseline", "fast")}
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 and r["warmup_s"] >= 0 for r in rows.values())
    assert set(summary["speedup_vs_baseline"]) == {"GPT-tiny/256/2/cfg", "GPT-tiny/256/2/fast"}
    assert "baseline-compiled" in bench.ENGINES and summary["speedup_vs_baseline_compiled"] == {}
    assert out[0].startswith("engine,preset,")  # the CSV header gpu_report parses


def test_bench_generate_profile_prints_the_top_ops_per_step(capsys, single_thread):
    """--profile (the decode-step table of issue 20; on CPU the top ops by self CPU time): a markdown table on
    stderr and the same rows in the JSON line, per step of one profiled generation."""
    bench = _load("bench_generate")
    bench.main(["--preset", "tiny", "--batch", "2", "--tokens", "256", "--modes", "cfg", "--engines", "ours",
                "--device", "cpu", "--warmup-tokens", "2", "--copy-mb", "8", "--profile", "--profile-top", "60"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    (profile,) = summary["profiles"]
    assert (profile["preset"], profile["batch"], profile["mode"], profile["tokens"]) == ("GPT-tiny", 2, "cfg", 256)
    rows = profile["rows"]
    assert 10 < len(rows) <= 60 and all(r["ms_per_step"] >= 0 and r["launches_per_step"] > 0 for r in rows)
    assert [r["ms_per_step"] for r in rows] == sorted((r["ms_per_step"] for r in rows), reverse=True)
    gemms = next(r for r in rows if r["name"] == "aten::mm")  # per step: 4 GEMMs x 2 layers + the head
    assert 8.9 <= gemms["launches_per_step"] <= 9.1
    assert "# profile ours GPT-tiny b2 cfg 256 tokens" in captured.err and "| op | ms/step | launches/step |" in captured.err


def test_bench_t2i_reports_seconds_per_image(capsys, single_thread):
    _load("bench_t2i").main(["--preset", "tiny", "--device", "cpu", "--batch", "2", "--modes", "slow"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]
    assert row["mode"] == "slow" and row["seconds_per_image"] > 0 and row["paper_s_per_image"] == 48.7
    assert row["generate_s"] + row["decode_s"] == pytest.approx(row["seconds_per_image"] * 2, rel=1e-2)


# ---------------------------------------------------------------------- every script, as a user starts it
REPO = BENCH.parent
# script -> (arguments for a smoke run of a few seconds on CPU, what the run covers, text its stdout must hold).
# {tmp} is a fresh directory for the files a script writes. Scripts that need CUDA run their CPU mode, and say so.
SMOKE = {
    "bench_block_kernels.py": (["--device", "cpu", "--quick", "--threads", "1", "--presets", "GPT-B", "--rows", "1",
                                "--filled", "64", "--interpret", "--out-dir", "{tmp}"],
                               "CPU: torch references + the Triton kernels under the interpreter (no timing value)",
                               '"rows": '),
    "bench_generate.py": (["--preset", "tiny", "--batch", "1", "--tokens", "256", "--modes", "fast", "--engines",
                           "ours", "baseline", "--device", "cpu", "--warmup-tokens", "2", "--copy-mb", "8"],
                          "CPU: our engine and the LlamaGen-style baseline (baseline_decoder.py) on a tiny model",
                          '"speedup_vs_baseline"'),
    "bench_jacobi.py": (["--quick"], "CPU: the shipped mini world, CFG, W = 16, 3 classes x 2 images",
                        '"all_identical": true'),
    "bench_jacobi_throughput.py": (["--preset", "tiny", "--batch", "1", "--num-tokens", "16", "--device", "cpu"],
                                   "CPU: a tiny random model, 16 tokens, sequential and Jacobi",
                                   '"decoding": "jacobi"'),
    "bench_kernels.py": (["--device", "cpu", "--quick", "--threads", "1", "--batches", "1", "--vocab", "256"],
                         "CPU mode: torch reference vs LlamaGen's chain; the fused kernels need CUDA",
                         '"impl": "chain"'),
    "bench_noise_model_dtype.py": (["--configs", "tiny", "--seeds", "1"], "CPU: the tiny noise model, bf16 vs fp32",
                                   '"tiny"'),
    "bench_quality.py": (["--images-per-class", "1", "--seeds", "0", "--cfg-scales", "2", "--w2s-scales", "1.5",
                          "--schedule-fractions", "0.5", "--real-per-class", "2", "--threads", "1", "--out-dir",
                          "{tmp}"], "CPU: the shipped mini world, one image per class and configuration",
                         '"markdown"'),
    "bench_t2i.py": (["--preset", "tiny", "--device", "cpu", "--batch", "1", "--modes", "slow"],
                     "CPU: a tiny text-to-image model", '"seconds_per_image"'),
    "bench_weak_cost.py": (["--base", "GPT-B", "--weak", "W-1", "--batch", "1", "--repeats", "1", "--threads", "1"],
                           "CPU: GPT-B shapes, one timed step per variant", '"logits_in"'),
    "compare_weak_inputs.py": (["--dim", "32", "--vocab", "64", "--images", "20", "--steps", "2", "--weak-dim",
                                "32"], "CPU: both weak-model designs, 2 training steps", '"logits"'),
    "fused_step_agreement.py": (["--seeds", "1", "--num-tokens", "3"],
                                "CPU: the interpreted fused decode step vs the eager loop, tiny models, one seed",
                                '"differing_tokens": 0'),
    "gpu_report.py": (["--dry-run"], "the plan only: the report itself needs CUDA (tests/test_gpu_report.py)",
                      "bench_generate.py"),
    "select_rounds.py": (["--scales", "3,0.05", "--vocab", "500", "--rows", "16"],
                         "CPU: the sampler select's candidate rounds replayed on the host", '"rows_out"'),
    "kernel_resources.py": (["--batches", "1", "--vocab", "256"],
                            "compiles the sampling kernels for an H100 with Triton + ptxas; needs no GPU",
                            ",select("),
}
# Modules the scripts import, with no command line of their own; the smoke run that executes them.
LIBRARIES = {"baseline_decoder.py": "bench_generate.py"}


def test_every_benchmark_script_has_a_smoke_run():
    scripts = {p.name for p in BENCH.glob("*.py")}
    assert scripts == set(SMOKE) | set(LIBRARIES)
    assert all(LIBRARIES[name] in SMOKE and "baseline" in SMOKE[LIBRARIES[name]][0] for name in LIBRARIES)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_script_runs_from_the_command_line(script, tmp_path):
    """`python benchmarks/<script> ...` from the repository root, as the README and RESULTS.md start them."""
    import os
    import subprocess
    import sys

    if script in ("kernel_resources.py", "fused_step_agreement.py"):
        pytest.importorskip("triton")
    if script == "bench_noise_model_dtype.py":
        pytest.importorskip("diffusers")
    args, _, expected = SMOKE[script]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, f"benchmarks/{script}", *[a.replace("{tmp}", str(tmp_path)) for a in args]],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert expected in run.stdout, run.stdout[-3000:]
    if script == "compare_weak_inputs.py":
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert all(result[name]["ratio"] > 0 for name in ("hidden", "logits"))


def test_bench_block_kernels_smoke_runs_every_op_on_cpu(capsys, tmp_path, single_thread):
    """The block-kernel benchmark on CPU with the interpreted kernels (a correctness smoke run, not a timing): every
    op, the fused decode-layer kernels beside today's unfused ops, the % of the bandwidth floor."""
    import csv

    bench = _load("bench_block_kernels")
    bench.main(["--device", "cpu", "--quick", "--threads", "1", "--interpret", "--presets", "tiny", "--rows", "3",
                "--filled", "64", "--out-dir", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["bandwidth_gbs"] > 0
    rows = list(csv.DictReader(open(summary["csv"])))
    impls = {(r["op"], r["impl"]) for r in rows}
    for op in bench.OPS:
        assert (op, "triton") in impls and (op, "torch") in impls, op
    assert {("norm_qkv_rope", "unfused"), ("norm_w13_swiglu", "unfused")} <= impls
    for r in rows:
        us, floor, pct = float(r["us_per_call"]), float(r["floor_us"]), float(r["pct_of_floor"])
        assert us > 0 and floor > 0 and pct == pytest.approx(100 * floor / us, rel=0.01, abs=0.1)
        if r["impl"] in ("triton", "unfused"):
            assert float(r["max_abs_diff_vs_torch"]) <= 1e-4, r
    assert all(r["speedup_vs_unfused"] for r in rows if r["op"].startswith("norm_"))


def test_select_rounds_replays_the_candidate_sequence(capsys, single_thread):
    """benchmarks/select_rounds.py on a small vocabulary: peaked rows are accepted at the first test, flat rows
    with a small top-k need rejections, and the rounds are those of an independent count (rank of each
    successive race winner above the last rejected one)."""
    bench = _load("select_rounds")
    bench.main(["--scales", "3,0.05", "--vocab", "500", "--rows", "64"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows_out"]
    by = {(r["scale"], r["top_k"], r["top_p"]): r for r in rows}
    assert by[(3.0, 2000, 1.0)]["first_test_accepts"] == 1.0  # top-k >= V: nothing is ever cut
    assert by[(0.05, 50, 1.0)]["first_test_accepts"] < 0.5 and by[(0.05, 50, 1.0)]["mean_rejections"] > 1
    import torch

    x = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    score = torch.tensor([[0.0, 9.0, 5.0, 1.0]])  # winners: col 1 (x=1), then col 2 (x=2), then col 0 (x=3)
    assert bench.rounds(x, score, top_k=1, top_p=1.0).tolist() == [2]
    assert bench.rounds(x, score, top_k=2, top_p=1.0).tolist() == [1]
    assert bench.rounds(x, score, top_k=3, top_p=1.0).tolist() == [0]
