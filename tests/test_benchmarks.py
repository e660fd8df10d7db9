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
