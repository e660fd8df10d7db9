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
    generate = [p for p in phases if p.name.startswith("generate")]
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


def test_engine_targets_are_checked_against_the_measured_rows():
    report = _load("gpu_report")
    fields = _load("bench_generate").FIELDS

    def row(engine, preset, batch, mode, ms, tokens=256, pct=50.0, warmup=3.0):
        values = {f: "" for f in fields}
        values.update(engine=engine, preset=preset, batch=batch, tokens=tokens, mode=mode, status="ok",
                      ms_per_step=ms, pct_of_floor=pct, warmup_s=warmup)
        return ",".join(str(values[f]) for f in fields)

    gen = "\n".join([",".join(fields), row("ours", "GPT-XL", 8, "cfg", 0.9), row("baseline-compiled", "GPT-XL", 8,
                                                                                   "cfg", 2.72),
                     row("ours", "GPT-XL", 64, "cfg", 2.5, pct=61.6), row("ours", "GPT-XL", 64, "fast", 1.6)])
    t2i = "preset,mode,seconds_per_image\nGPT-XL-t2i,slow,0.8"
    phases = [report.Phase("generate ours GPT-XL", ["python", "benchmarks/bench_generate.py"], 1.0, stdout=gen),
              report.Phase("targets t2i", ["python", "benchmarks/bench_t2i.py"], 1.0, stdout=t2i)]
    table = "\n".join(report.targets_table(phases))
    assert "| GPT-XL b8 CFG ms/step | 0.900 | <= 1.0 | yes |" in table
    assert "| GPT-XL b8 CFG: compiled LlamaGen ms/step / ours | 3.022 | >= 2.7 | yes |" in table
    assert "| GPT-XL b64 CFG ms/step | 2.500 | <= 2.3 | no |" in table
    assert "| GPT-XL b64 CFG % of the bandwidth floor | 61.600 | >= 65 | no |" in table
    assert "| CoRe^2 fast / CFG images/s, GPT-XL b64 x 256 | 1.562 | >= 1.4 | yes |" in table
    assert "| GPT-B b1 CFG ms/step | not measured | <= 0.3 | – |" in table
    assert "s/image incl. VQ decode | 0.800 | <= 1.0 | yes |" in table


def test_jacobi_phase_is_planned_and_its_rows_become_a_table(single_thread, capsys):
    """The Jacobi phase runs bench_jacobi_throughput.py (here on CPU, tiny model, 24 tokens) and the report reads
    its CSV rows."""
    report = _load("gpu_report")
    args = Namespace(presets=["XL"], batches=[8], modes=["cfg"], skip_tests=True, skip_kernels=True,
                     skip_generate=False, skip_jacobi=False)
    phase = next(p for p in report.plan(args, ["ours"]) if p.name.startswith("jacobi"))
    assert "bench_jacobi_throughput.py --preset XL --batch 1 8" in phase.command
    _load("bench_jacobi_throughput").main(["--preset", "tiny", "--batch", "2", "--num-tokens", "24", "--device",
                                           "cpu"])
    rows = report.csv_rows(capsys.readouterr().out, "preset")
    assert [r["decoding"] for r in rows] == ["sequential", "jacobi"]
    assert int(rows[0]["forward_passes"]) == 24 and int(rows[1]["forward_passes"]) <= 24
    table = "\n".join(report.jacobi_table(rows))
    assert "| 2 | jacobi |" in table and "| 2 | sequential |" in table


def test_kernel_and_profile_tables_read_the_benchmarks_own_output(capsys):
    """The sampler table shows the graph time per call of both select paths and the select's own share (a
    filtered row's graph time minus the unfiltered row of that batch); the profile section copies the table
    bench_generate.py --profile prints."""
    report = _load("gpu_report")
    kernels = _load("bench_kernels")
    generate = _load("bench_generate")

    def row(impl, k, p, us):
        values = dict(device="H200", impl=impl, batch=64, vocab=16384, top_k=k, top_p=p, us_per_call=us, gb_per_s=1,
                      pct_of_copy=1, speedup_vs_chain=round(314 / us, 2), launch="")
        return ",".join(str(values[f]) for f in kernels.FIELDS)

    stdout = "\n".join([",".join(kernels.FIELDS), row("fused_graph", 0, 1.0, 9.8), row("fused", 2000, 1.0, 60.0),
                        row("fused_graph", 2000, 1.0, 11.3), row("torchsel_graph", 2000, 1.0, 120.5),
                        row("chain", 2000, 1.0, 314.0), '{"rows": []}'])
    table = "\n".join(report.kernel_table(report.csv_rows(stdout, "device")))
    assert "| 64 | 2000 / 1.0 | 60.0 | 11.3 | 1.5 | 120.5 | – | 314.0 | 27.79x |" in table
    assert "| 64 | 0 / 1.0 | – | 9.8 | – | – | – | – | 32.04x |" in table

    rows = [dict(name="_select_kernel", ms_per_step=0.0123, launches_per_step=1.0, pct=0.6),
            dict(name="_mix_race_kernel", ms_per_step=0.004, launches_per_step=1.0, pct=0.2)]
    generate.print_profile("ours GPT-XL b8 cfg 256 tokens on H200", rows, torch.device("cuda"), 0.0163)
    profile = report.profile_table("noise before\n" + capsys.readouterr().err + "gpu_report: done\n")
    assert profile[0].startswith("profile ours GPT-XL b8 cfg 256 tokens on H200: top 2 kernels by GPU time")
    assert "| _select_kernel | 0.0123 | 1.00 | 0.6 |" in profile and "| _mix_race_kernel | 0.0040 | 1.00 | 0.2 |" in profile
    assert report.profile_table("")[0].startswith("Not measured")


def test_issue21_targets_run_first_and_the_dry_run_shows_the_time_budget():
    report = _load("gpu_report")
    engines = report.discover_engines()
    args = Namespace(presets=["B", "XL", "XXL"], batches=[8, 64, 1], modes=["cfg", "cond", "fast", "slow"],
                     skip_tests=False, skip_kernels=False, skip_generate=False, budget_s=450.0)
    phases = report.plan(args, engines)
    first = [p.command for p in phases[:5]]
    assert all(p.name.startswith("targets") for p in phases[:5])
    assert "--preset XL" in first[0] and "--batch 8 64 1 --modes cfg fast --count-kernels" in first[0]
    assert "--preset B" in first[1] and "--batch 1 --modes cfg fast" in first[1]
    assert "--tokens 576 --batch 64 --modes cfg fast" in first[2]
    assert "--engines baseline-compiled --preset XL" in first[3] and "--batch 8 --modes cfg" in first[3]
    assert "bench_block_kernels.py --issue-shapes --device cuda --dtype bf16" in first[4]
    slices = report.budget_plan(phases, 450.0)
    assert abs(sum(seconds for _, seconds in slices) - 450.0) < 1e-6 and all(s > 0 for _, s in slices)
    assert slices[0][1] == 0.2 * 450.0

    run = subprocess.run([sys.executable, "benchmarks/gpu_report.py", "--dry-run", "--engines", "ours",
                          "baseline-compiled"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("gpu_report plan: ") and "in a 450 s budget" in lines[0] and "7.5 min" in lines[0]
    assert lines[1].startswith("targets ours GPT-XL b8 b64 b1, CFG and fast: at least 90 s (20% of the time left): "
                               "python benchmarks/bench_generate.py")
    assert len(lines) == 1 + len(report.plan(Namespace(**{**vars(args), "budget_s": 450.0}),
                                             ["ours", "baseline-compiled"]))


def test_issue21_table_marks_each_target_and_lists_the_guards_choices():
    report = _load("gpu_report")
    fields = _load("bench_generate").FIELDS
    block_fields = ["device", "dtype", "timing", "op", "preset", "rows", "filled", "impl", "us_per_call", "gb_per_s",
                    "floor_us", "pct_of_floor", "speedup_vs_torch", "speedup_vs_unfused", "max_abs_diff_vs_torch"]

    def row(engine, preset, batch, mode, ms, tokens=256, pct=50.0, kernels=""):
        values = {f: "" for f in fields}
        values.update(engine=engine, preset=preset, batch=batch, tokens=tokens, mode=mode, status="ok",
                      ms_per_step=ms, pct_of_floor=pct, kernels_per_step=kernels)
        return ",".join(str(values[f]) for f in fields)

    def block(op, preset, rows, filled, impl, us, pct, x_unfused=""):
        values = dict(device="H200", dtype="bf16", timing="graph", op=op, preset=preset, rows=rows, filled=filled,
                      impl=impl, us_per_call=us, gb_per_s=1, floor_us=1, pct_of_floor=pct, speedup_vs_torch=1.5,
                      speedup_vs_unfused=x_unfused, max_abs_diff_vs_torch="")
        return ",".join(str(values[f]) for f in block_fields)

    gen = "\n".join([",".join(fields), row("ours", "GPT-XL", 8, "cfg", 0.95, kernels=230.0),
                     row("baseline-compiled", "GPT-XL", 8, "cfg", 2.6), row("ours", "GPT-XL", 64, "cfg", 2.0, pct=66),
                     row("ours", "GPT-XL", 64, "fast", 1.5), row("ours", "GPT-B", 1, "cfg", 0.3),
                     row("ours", "GPT-B", 1, "fast", 0.28), row("ours", "GPT-XL", 1, "cfg", 1.0),
                     row("ours", "GPT-XL", 1, "fast", 1.1)])
    stderr = ("llamagen_core2.kernels: timed choice: decode.linear on cuda:0 (16, 1280, 1280, 'bfloat16'): fused "
              "(unfused 6.1 us, fused 3.9 us)\n"
              "llamagen_core2.kernels: timed choice: decode.norm_qkv_rope on cuda:0 (128, 1, 1280, 3840, 'bfloat16'): "
              "unfused (unfused 9.0 us, fused 11.2 us)\n")
    blocks = "\n".join([",".join(block_fields), block("decode_attention", "GPT-XL", 16, 128, "triton", 3.5, 70),
                        block("decode_attention", "GPT-XL", 128, 256, "triton", 30, 58),
                        block("wo", "GPT-XL", 16, "-", "triton", 2.0, 72),
                        block("norm_qkv_rope", "GPT-XL", 16, "-", "triton", 4.0, 75, 1.8),
                        block("norm_qkv_rope", "GPT-XL", 16, "-", "unfused", 7.2, 40), '{"rows": 5}'])
    phases = [report.Phase("targets ours", ["python", "benchmarks/bench_generate.py"], 1.0, stdout=gen,
                           stderr=stderr),
              report.Phase("targets block", ["python", "benchmarks/bench_block_kernels.py"], 1.0, stdout=blocks)]
    table = "\n".join(report.issue21_table(phases))
    assert "| GPT-XL b8 CFG: compiled LlamaGen ms/step / ours | 2.737 | >= 2.7 | yes |" in table
    assert "| GPT-XL b8 CFG ms/step | 0.950 | <= 0.97 | yes |" in table
    assert "| GPT-XL b64 CFG % of the bandwidth floor | 66.000 | >= 65 | yes |" in table
    assert "| GPT-B b1 CFG ms/step | 0.300 | <= 0.25 | no |" in table
    assert "| CoRe^2 fast / CFG images/s, GPT-XL b64 x 256 | 1.333 | >= 1.4 | no |" in table
    assert "| CoRe^2 fast / CFG images/s, GPT-XL b64 x 576 | not measured | >= 1.5 | – |" in table
    assert "| CoRe^2 fast / CFG images/s, GPT-B b1 | 1.071 | >= 1.0 | yes |" in table
    assert "| CoRe^2 fast / CFG images/s, GPT-XL b1 | 0.909 | >= 1.0 | no |" in table
    assert "| decode attention µs per layer, GPT-XL 16 rows x 128 keys | 3.500 | <= 4.0 | yes |" in table
    assert "| decode attention % of its KV-read floor, GPT-XL 128 rows x 256 keys | 58.000 | >= 60 | no |" in table
    assert "lowest % of the bandwidth floor at the issue shapes | not measured |" in table  # 2 of 12 measured
    assert "GPT-XL b8 CFG (an upper bound on launches per layer) | 6.389 | <= 6.5 | yes |" in table
    kernels = "\n".join(report.block_table(report.csv_rows(blocks, "device")))
    assert "| norm_qkv_rope | GPT-XL | 16 | - | 4.00 | 7.20 | – | 75.0 | 1.80 | 1.50 |" in kernels
    choices = "\n".join(report.choices_table(phases))
    assert "| decode.linear | (16, 1280, 1280, 'bfloat16') | fused | unfused 6.1 us, fused 3.9 us |" in choices
    assert "| decode.norm_qkv_rope | (128, 1, 1280, 3840, 'bfloat16') | unfused |" in choices
    assert report.choices_table([])[0].startswith("None logged")
