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


def test_bench_t2i_reports_seconds_per_image(capsys, single_thread):
    _load("bench_t2i").main(["--preset", "tiny", "--device", "cpu", "--batch", "2", "--modes", "slow"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]
    assert row["mode"] == "slow" and row["seconds_per_image"] > 0 and row["paper_s_per_image"] == 48.7
    assert row["generate_s"] + row["decode_s"] == pytest.approx(row["seconds_per_image"] * 2, rel=1e-2)


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
