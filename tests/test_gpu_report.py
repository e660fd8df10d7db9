"""benchmarks/gpu_report.py: one clear line without CUDA; its plan covers the grid; its tables read the
benchmarks' own output format."""
import importlib.util
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_it_exits_with_one_line_and_writes_nothing():
    results = REPO / "benchmarks" / "results"
    before = sorted(results.iterdir())
    run = subprocess.run([sys.executable, "benchmarks/gpu_report.py"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1 and "CUDA is not available" in run.stderr
    assert sorted(results.iterdir()) == before


def test_plan_covers_the_grid_with_bench_generates_own_engines():
    report = _load("gpu_report")
    engines = report.discover_engines()
    assert "ours" in engines and len(engines) >= 2  # read from bench_generate.py --help, not kept in the report
    args = Namespace(presets=["B", "XL", "XXL"], batches=[8, 64, 1], modes=["cfg", "cond", "fast", "slow"],
                     skip_tests=False, skip_kernels=False, skip_generate=False)
    phases = report.plan(args, engines)
    commands = [p.command for p in phases]
    assert any("-m pytest -m gpu" in c for c in commands) and any("bench_kernels.py" in c for c in commands)
    generate = [p for p in phases if "bench_generate.py" in p.command]
    assert {p.argv[p.argv.index("--preset") + 1] for p in generate} == {"B", "XL", "XXL"}
    for p in generate:
        assert "--batch 8 64 1" in p.command and "--modes cfg cond fast slow" in p.command
        assert "--device cuda" in p.command and "--repeats 1" in p.command
    baseline_engines = {e for p in generate if "ours" not in p.argv for e in engines if e in p.argv}
    assert baseline_engines == set(engines) - {"ours"}


def test_tables_read_bench_generate_rows_and_name_what_was_not_measured():
    report = _load("gpu_report")
    fields = _load("bench_generate").FIELDS  # the CSV header bench_generate writes

    def row(engine, batch, mode, ms):
        values = dict(engine=engine, preset="GPT-XL", device="H100", dtype="bfloat16", batch=batch, tokens=256,
                      mode=mode, status="ok", seconds=1, images_per_s=batch / (ms * 0.256), tokens_per_s=1,
                      ms_per_step=ms, bytes_per_step=1, achieved_GBps=1, floor_ms_per_step=0.64, pct_of_floor=12.3,
                      peak_mem_MB=1, warmup_s=1, kernels_per_step="", weak_model="", note="")
        return ",".join(str(values[f]) for f in fields)

    stdout = "\n".join([",".join(fields), row("ours", 8, "cfg", 2.0), row("baseline", 8, "cfg", 5.0), '{"rows": []}'])
    phases = [report.Phase("generate ours+baseline GPT-XL", ["x"], 1.0, rc=0, stdout=stdout)]
    args = Namespace(presets=["XL"], batches=[8], modes=["cfg", "fast"], budget_s=450.0)
    table = "\n".join(report.generate_table(phases, args, ["ours", "baseline"]))
    assert "| GPT-XL | 8 | cfg | 0.640 | 2.000 (15.62) | 5.000 (6.25) | 12.3% | 2.50x |" in table
    assert "ours GPT-XL b8 fast" in table and "baseline GPT-XL b8 fast" in table
    assert "--preset XL --batch 8 --modes fast --engines baseline ours" in table
