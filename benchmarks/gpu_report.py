"""Every GPU figure in one command: `python benchmarks/gpu_report.py` on a CUDA machine.

It runs, each as its own subprocess under one time budget (default 450 s, so the whole report fits in 8 minutes
on an H100 with start-up included):
  0. issue 21's targets first (the decode layer at small batch), so a short budget still measures them:
     our engine at GPT-XL b8 / b64 / b1 and GPT-B b1, CFG and CoRe^2 fast, 256 tokens (with the CUDA kernels
     per step), GPT-XL b64 CFG and fast at 576 tokens, the compiled LlamaGen peer at GPT-XL b8 CFG, and the
     decode-layer kernels at the issue's shapes (bench_block_kernels.py --issue-shapes: each fused kernel vs
     today's ops and cuBLAS, % of the bandwidth floor); the report's first table marks each against its target
     and lists the timed-choice guard's decisions (fused kernel or today's ops, per op and shape);
  1. the `gpu` tests (`pytest -m gpu tests/`): engines agree on CUDA, CUDA graphs, in-graph sampling, bf16 vs
     fp32, --device cuda on every command line;
  2. benchmarks/bench_kernels.py: the fused guided-sampling kernel vs the torch reference vs LlamaGen's chain,
     per call eagerly and inside a CUDA graph, with both select paths (the rejection select kernel and the
     torch.topk / sort thresholds the engine's dispatch times it against); the select's own share per call is
     the graph time of a filtered row minus the unfiltered row of the same batch;
  2b. bench_generate.py --profile at GPT-XL b8 CFG: the decode step's top kernels by GPU time per step (the
     select kernel's row);
  3. benchmarks/bench_generate.py with our engine: GPT-B, XL, XXL x batch 1, 8, 64 x cond/cfg/fast/slow,
     256 tokens, bf16;
  4. bench_generate.py with every baseline engine it offers (read from its own `--engines` choices, so an
     engine added there is measured here too), the same grid, batch 8 first;
  5. the engine target that needs other shapes: text-to-image GPT-XL at 512 px, batch 8, CoRe^2 slow, end to end
     with the VQ decode (bench_t2i.py);
  6. Jacobi vs sequential decoding with the same engine, GPT-XL b1 and b8 CFG (bench_jacobi_throughput.py):
     random weights, so its acceptance means nothing; the window pass's cost and the images/s it projects at
     the compression measured on the trained mini world (docs/decoding.md).
The report starts with issue 21's targets and ends with the decode-engine targets (issue 12), each checked
against the measured rows.
Budget: every generation is timed once (`--repeats 1`); baselines warm up on 8 tokens instead of a whole image
(ours warms up on all tokens, which times the guard's choices and captures its CUDA graphs); each phase gets a
slice of the time left (its share; the last phase all of it) and is stopped at its deadline, keeping the rows it
finished: the phases together never run past the budget. `--dry-run` prints each phase with the least time it
gets (its slice when every earlier phase uses all of its own). Configurations that did not fit are listed with the
command that measures them. Everything is stated in the report.

Output: ONE markdown file, benchmarks/results/gpu_report_<date>_<gpu>.md (or --out), with the GPU name, torch /
CUDA / triton versions, the date, the exact command, each phase's command, exit status and seconds, and the
tables. Without CUDA the script exits at once with one line and status 2 (nothing is written).

    python benchmarks/gpu_report.py                         # the full report
    python benchmarks/gpu_report.py --budget-s 900          # more time: more baseline configurations
    python benchmarks/gpu_report.py --dry-run               # print the plan and its time budget (no GPU needed)
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
PRESETS = ("B", "XL", "XXL")
BATCHES = (8, 64, 1)  # batch 8 first: the headline comparison when the budget runs short
MODES = ("cfg", "cond", "fast", "slow")
TOKENS = 256
BASELINE_WARMUP_TOKENS = 8
JACOBI_WINDOW = 16
# Forward passes per image, sequential / Jacobi, on the trained mini world (CFG 3, W = 16, each image decoded
# alone, mean over seeds 0-3; docs/decoding.md): the Jacobi phase projects images/s with it from the measured cost
# of a window pass (random weights: their own acceptance means nothing).
JACOBI_COMPRESSION = 2.17


@dataclass
class Phase:
    name: str
    argv: list
    share: float  # fraction of the time left when the phase starts (the last phase gets all of it)
    rc: Optional[int] = None
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def command(self) -> str:
        """The command as typed from the repository root."""
        return " ".join("python" if a == sys.executable else shlex.quote(str(a)) for a in self.argv)


def discover_engines(python: str = sys.executable) -> list[str]:
    """bench_generate.py's --engines choices, read from its own --help (never a list kept here)."""
    out = subprocess.run([python, "benchmarks/bench_generate.py", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    match = re.search(r"--engines \{([^}]*)\}", out.stdout)
    if out.returncode != 0 or match is None:
        raise SystemExit(f"gpu_report: could not read the --engines choices of bench_generate.py "
                         f"(exit {out.returncode}): {out.stderr.strip()[-300:]}")
    return [e.strip() for e in match.group(1).split(",") if e.strip()]


def issue21_phases(args, engines: list[str]) -> list[Phase]:
    """Issue 21's target measurements (the decode layer at small batch), run before everything else."""
    py = sys.executable
    if getattr(args, "skip_generate", False):
        return []
    common = ["--device", "cuda", "--dtype", "bf16", "--repeats", "1"]
    phases = []
    if "ours" in engines:
        phases += [
            Phase("targets ours GPT-XL b8 b64 b1, CFG and fast",
                  [py, "benchmarks/bench_generate.py", "--engines", "ours", "--preset", "XL", *common, "--tokens",
                   str(TOKENS), "--batch", "8", "64", "1", "--modes", "cfg", "fast", "--count-kernels"], share=0.2),
            Phase("targets ours GPT-B b1, CFG and fast",
                  [py, "benchmarks/bench_generate.py", "--engines", "ours", "--preset", "B", *common, "--tokens",
                   str(TOKENS), "--batch", "1", "--modes", "cfg", "fast", "--count-kernels"], share=0.12),
            Phase("targets ours GPT-XL 576 tokens",
                  [py, "benchmarks/bench_generate.py", "--engines", "ours", "--preset", "XL", *common, "--tokens",
                   "576", "--batch", "64", "--modes", "cfg", "fast"], share=0.15)]
    if "baseline-compiled" in engines:  # the headline peer: one compile
        phases.append(Phase("targets baseline-compiled GPT-XL b8 CFG",
                            [py, "benchmarks/bench_generate.py", "--engines", "baseline-compiled", "--preset", "XL",
                             *common, "--tokens", str(TOKENS), "--batch", "8", "--modes", "cfg", "--warmup-tokens",
                             str(BASELINE_WARMUP_TOKENS)], share=0.3))
    if not getattr(args, "skip_kernels", False):
        phases.append(Phase("targets block kernels at the issue shapes",
                            [py, "benchmarks/bench_block_kernels.py", "--issue-shapes", "--device", "cuda", "--dtype",
                             "bf16", "--iters", "50", "--warmup", "5"], share=0.25))
    return phases


def plan(args, engines: list[str]) -> list[Phase]:
    py = sys.executable
    phases = issue21_phases(args, engines)
    if not args.skip_tests:
        phases.append(Phase("gpu tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
                                          "tests/"], share=0.3))
    if not args.skip_kernels:
        phases.append(Phase("kernels", [py, "benchmarks/bench_kernels.py", "--device", "cuda", "--iters", "50",
                                        "--warmup", "5", "--torch-select"], share=0.15))
    if not args.skip_generate:
        phases.append(Phase("profile ours GPT-XL b8 CFG",
                            [py, "benchmarks/bench_generate.py", "--engines", "ours", "--preset", "XL", "--device",
                             "cuda", "--dtype", "bf16", "--tokens", str(TOKENS), "--repeats", "1", "--batch", "8",
                             "--modes", "cfg", "--profile", "--profile-top", "12"], share=0.12))
    common = ["--device", "cuda", "--dtype", "bf16", "--tokens", str(TOKENS), "--repeats", "1",
              "--batch", *map(str, args.batches), "--modes", *args.modes]
    ours = [e for e in engines if e == "ours"]
    baselines = [e for e in engines if e != "ours"]
    if ours and not args.skip_generate:
        for i, preset in enumerate(args.presets):
            count = ["--count-kernels"] if preset == args.presets[0] else []  # kernels/step of one preset
            phases.append(Phase(f"generate ours GPT-{preset}",
                                [py, "benchmarks/bench_generate.py", "--engines", *ours, "--preset", preset,
                                 *common, *count], share=1.0 / (len(args.presets) - i + 2.5)))
        phases.append(Phase("targets t2i GPT-XL 512 px", [py, "benchmarks/bench_t2i.py", "--preset", "XL",
                                                          "--batch", "8", "--modes", "slow", "cfg"], share=0.3))
        if not getattr(args, "skip_jacobi", False):
            phases.append(Phase("jacobi GPT-XL b1 b8 CFG",
                                [py, "benchmarks/bench_jacobi_throughput.py", "--preset", "XL", "--batch", "1", "8",
                                 "--device", "cuda", "--window", str(JACOBI_WINDOW), "--compression",
                                 str(JACOBI_COMPRESSION)], share=0.2))
    if baselines and not args.skip_generate:
        for i, preset in enumerate(args.presets):
            phases.append(Phase(f"generate {'/'.join(baselines)} GPT-{preset}",
                                [py, "benchmarks/bench_generate.py", "--engines", *baselines, "--preset", preset,
                                 *common, "--warmup-tokens", str(BASELINE_WARMUP_TOKENS)],
                                share=1.0 / (len(args.presets) - i)))
    return phases


def run_phase(phase: Phase, seconds: float) -> None:
    started = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(phase.argv, capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=max(1.0, seconds))
        phase.rc, phase.stdout, phase.stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:  # keep what it printed: finished CSV rows survive the deadline
        phase.timed_out, phase.rc = True, None
        phase.stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        phase.stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    phase.seconds = time.perf_counter() - started


# ---------------------------------------------------------------------- parsing the phases' output
def csv_rows(text: str, first_field: str) -> list[dict]:
    """The CSV block of a benchmark's stdout (header starting with `first_field`), up to its JSON line."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(first_field + ",")), None)
    if start is None:
        return []
    block = []
    for line in lines[start:]:
        if line.startswith("{") or not line.strip():
            break
        block.append(line)
    return list(csv.DictReader(io.StringIO("\n".join(block))))


def pytest_summary(text: str) -> str:
    lines = [line.strip("= ").strip() for line in text.splitlines() if line.strip()]
    return next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|error|skipped)", line)),
                "no summary line")


def _num(value, digits=3) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return "–"


# ---------------------------------------------------------------------- the markdown report
def render(meta: dict, phases: list[Phase], args) -> str:
    out = [f"# GPU report — {meta['gpu']}, {meta['date']}", "",
           f"- GPU: **{meta['gpu']}** (compute capability {meta['capability']}); torch built for CUDA {meta['cuda']}",
           f"- torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}",
           f"- Date: {meta['date']} (UTC); total {meta['elapsed']:.0f} s of a {args.budget_s:.0f} s budget",
           f"- Command: `{meta['command']}` (run from the repository root)",
           "- Budget choices: each generation timed once (`--repeats 1`); "
           f"baselines warm up on {BASELINE_WARMUP_TOKENS} tokens, ours on a whole image (captures its CUDA "
           f"graphs); {TOKENS} tokens per image, bf16, random weights of the preset's shapes; phases stopped at "
           "their deadline keep the rows they finished. Our engine and the baselines run in separate processes of "
           "this report, one after the other, on the same GPU.", "",
           "## Phases", "", "| phase | exit | seconds | command |", "|---|---|---|---|"]
    for p in phases:
        status = "stopped at its deadline" if p.timed_out else ("not run" if p.rc is None else str(p.rc))
        out.append(f"| {p.name} | {status} | {p.seconds:.0f} | `{p.command}` |")
    for p in phases:
        if p.rc not in (0, None) and p.stderr.strip():
            out += ["", f"{p.name} (exit {p.rc}), last lines of its stderr:", "", "```",
                    *p.stderr.strip().splitlines()[-15:], "```"]
    out += ["", "## Decode-layer targets (issue 21; bf16, CFG 4.0, top-k 2000, 256 tokens unless stated)", ""]
    out += issue21_table(phases)
    block = next((p for p in phases if "bench_block_kernels.py" in p.command), None)
    if block is not None:
        out += ["", "## Decode-layer kernels at the issue's shapes (bench_block_kernels.py --issue-shapes; bf16, "
                "inside CUDA graphs)", "",
                "`triton`: the fused kernel; `unfused`: today's ops for the same work (the Triton row kernels around "
                "cuBLAS); `torch`: the reference (cuBLAS for wo / w2). % of floor: the op's compulsory bytes over the "
                "copy bandwidth, divided by its time.", ""]
        out += block_table(csv_rows(block.stdout, "device"))
    out += ["", "## The guard's decode-layer decisions (timed once per op and shape at warm-up)", ""]
    out += choices_table(phases)
    tests = next((p for p in phases if p.name == "gpu tests"), None)
    if tests is not None and (tests.rc is not None or tests.timed_out):
        out += ["", "## GPU tests", "", f"`{pytest_summary(tests.stdout)}`", ""]
        failed = [line for line in tests.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        out += [f"- {line}" for line in failed]
    kernels = next((p for p in phases if p.name == "kernels"), None)
    if kernels is not None:
        out += ["", "## Fused guided sampling (bench_kernels.py; V = 16384, fp32 logits, CFG rows)", ""]
        out += kernel_table(csv_rows(kernels.stdout, "device"))
    profile = next((p for p in phases if p.name.startswith("profile")), None)
    if profile is not None:
        out += ["", "## Decode-step profile (bench_generate.py --profile; GPT-XL b8 CFG, 256 tokens, bf16, top-k 2000)",
                ""]
        out += profile_table(profile.stderr)
    out += ["", f"## Generation (bench_generate.py; {TOKENS} tokens, bf16, CFG 4.0, top-k 2000)", ""]
    out += generate_table(phases, args, meta.get("engines", []))
    jacobi = next((p for p in phases if p.name.startswith("jacobi")), None)
    if jacobi is not None:
        out += ["", f"## Jacobi vs sequential decoding (bench_jacobi_throughput.py; GPT-XL, {TOKENS} tokens, bf16, "
                f"CFG 4.0, top-k 2000, W = {JACOBI_WINDOW})", "",
                "Random weights: their acceptance (passes per image) means nothing. `ms/pass` is the cost of one "
                "window pass against one sequential step; `projected img/s` applies the compression measured on the "
                f"trained mini world ({JACOBI_COMPRESSION}x, docs/decoding.md) to it.", ""]
        out += jacobi_table(csv_rows(jacobi.stdout, "preset"))
    out += ["", "## Decode-engine targets (issue 12; H100, bf16, CFG 4.0, top-k 2000)", ""]
    out += targets_table(phases)
    return "\n".join(out) + "\n"


def _generate_rows(phases: list[Phase]) -> dict:
    return {(r["preset"], int(r["tokens"]), int(r["batch"]), r["mode"], r["engine"]): r
            for p in phases if "bench_generate.py" in p.command for r in csv_rows(p.stdout, "engine")
            if r["status"] == "ok"}


LAYERS = {"GPT-B": 12, "GPT-XL": 36}


def issue21_table(phases: list[Phase]) -> list[str]:
    """Issue 21's targets with their measured values ('not measured' otherwise)."""
    gen = _generate_rows(phases)
    block = [r for p in phases if "bench_block_kernels.py" in p.command for r in csv_rows(p.stdout, "device")]

    def value(preset, batch, mode="cfg", engine="ours", tokens=TOKENS, field="ms_per_step"):
        r = gen.get((preset, tokens, batch, mode, engine))
        return None if r is None or r.get(field) in (None, "") else float(r[field])

    def ratio(num, den):
        return None if num is None or den is None else num / den

    def kernel(op, preset, rows, filled="-", impl="triton", field="us_per_call"):
        r = next((r for r in block if (r["op"], r["preset"], r["rows"], r["filled"], r["impl"]) ==
                  (op, preset, str(rows), str(filled), impl)), None)
        return None if r is None else float(r[field])

    gemm_pcts = [kernel(op, preset, rows, field="pct_of_floor") for op in ("norm_qkv_rope", "wo", "norm_w13_swiglu",
                                                                          "w2")
                 for preset, rows in (("GPT-B", 2), ("GPT-XL", 16), ("GPT-XL", 128))]
    xl8_kernels = value("GPT-XL", 8, field="kernels_per_step")
    checks = [
        ("GPT-XL b8 CFG: compiled LlamaGen ms/step / ours", ratio(value("GPT-XL", 8, engine="baseline-compiled"),
                                                                  value("GPT-XL", 8)), ">=", 2.7),
        ("GPT-XL b8 CFG ms/step", value("GPT-XL", 8), "<=", 0.97),
        ("GPT-XL b64 CFG % of the bandwidth floor", value("GPT-XL", 64, field="pct_of_floor"), ">=", 65),
        ("GPT-B b1 CFG ms/step", value("GPT-B", 1), "<=", 0.25),
        ("CoRe^2 fast / CFG images/s, GPT-XL b64 x 256", ratio(value("GPT-XL", 64), value("GPT-XL", 64, "fast")),
         ">=", 1.4),
        ("CoRe^2 fast / CFG images/s, GPT-XL b64 x 576", ratio(value("GPT-XL", 64, tokens=576),
                                                             value("GPT-XL", 64, "fast", tokens=576)), ">=", 1.5),
        ("CoRe^2 fast / CFG images/s, GPT-B b1", ratio(value("GPT-B", 1), value("GPT-B", 1, "fast")), ">=", 1.0),
        ("CoRe^2 fast / CFG images/s, GPT-XL b1", ratio(value("GPT-XL", 1), value("GPT-XL", 1, "fast")), ">=", 1.0),
        ("decode attention µs per layer, GPT-XL 16 rows x 128 keys", kernel("decode_attention", "GPT-XL", 16, 128),
         "<=", 4.0),
        ("decode attention % of its KV-read floor, GPT-XL 128 rows x 256 keys",
         kernel("decode_attention", "GPT-XL", 128, 256, field="pct_of_floor"), ">=", 60),
        ("fused / skinny GEMMs, lowest % of the bandwidth floor at the issue shapes",
         None if None in gemm_pcts else min(gemm_pcts), ">=", 70),
        ("CUDA kernels per step / layers, GPT-XL b8 CFG (an upper bound on launches per layer)",
         None if xl8_kernels is None else xl8_kernels / LAYERS["GPT-XL"], "<=", 6.5),
    ]
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for name, measured, op, goal in checks:
        met = "–" if measured is None else ("yes" if (measured <= goal if op == "<=" else measured >= goal) else "no")
        lines.append(f"| {name} | {'not measured' if measured is None else _num(measured, 3)} | {op} {goal} | "
                     f"{met} |")
    lines += ["", "The last row divides every kernel of a step (the sampler, the head, the embedding and the weak "
              "model included) by the layers, so it overstates the per-layer count; the exact per-layer count on "
              "the CPU interpreter is tests/test_decode_launches.py's (6 with a split attention, 5 without)."]
    return lines


def block_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["Not measured (the phase produced no rows; see its exit status above)."]
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((r["op"], r["preset"], int(r["rows"]), r["filled"]), {})[r["impl"]] = r
    lines = ["| op | preset | rows | keys | triton µs | unfused µs | torch µs | triton % of floor | "
             "x unfused | x torch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (op, preset, n, filled), impls in by_key.items():
        us = {name: _num(impls[name]["us_per_call"], 2) if name in impls else "–"
              for name in ("triton", "unfused", "torch")}
        t = impls.get("triton", {})
        lines.append(f"| {op} | {preset} | {n} | {filled} | {us['triton']} | {us['unfused']} | {us['torch']} | "
                     f"{_num(t.get('pct_of_floor'), 1)} | {_num(t.get('speedup_vs_unfused'), 2)} | "
                     f"{_num(t.get('speedup_vs_torch'), 2)} |")
    return lines


CHOICE = re.compile(r"timed choice: (decode\.\w+) on (\S+) (\(.*?\)): (\w+) \((.*)\)")


def choices_table(phases: list[Phase]) -> list[str]:
    """The guard's decode-layer decisions logged by our engine's phases (one line per op and shape key)."""
    seen = {}
    for p in phases:
        if "bench_generate.py" not in p.command:
            continue
        for line in p.stderr.splitlines():
            m = CHOICE.search(line)
            if m:
                seen[(m.group(1), m.group(3))] = (m.group(4), m.group(5))
    if not seen:
        return ["None logged (no phase of our engine ran on CUDA, or the guard was forced by "
                "LLAMAGEN_CORE2_KERNELS)."]
    lines = ["| op | shape key (rows, dims, dtype) | chosen | times |", "|---|---|---|---|"]
    lines += [f"| {op} | {key} | {chosen} | {times} |" for (op, key), (chosen, times) in seen.items()]
    return lines


def phase_slice(phase: Phase, phases: list[Phase], left: float) -> float:
    """The seconds `phase` may run with `left` seconds to go: its share of them; the last phase gets all."""
    return left if phase is phases[-1] else left * min(1.0, phase.share)


def budget_plan(phases: list[Phase], budget_s: float) -> list[tuple[Phase, float]]:
    """(phase, the least seconds it gets): its share of the time left when every earlier phase uses its whole
    slice (earlier phases that finish sooner leave it more); the last phase gets all that is left."""
    left, out = budget_s, []
    for phase in phases:
        seconds = phase_slice(phase, phases, left)
        out.append((phase, seconds))
        left -= seconds
    return out


def targets_table(phases: list[Phase]) -> list[str]:
    """Each target with its measured value, from the rows the phases printed ('not measured' otherwise)."""
    gen = _generate_rows(phases)
    t2i = {r["mode"]: r for p in phases if "bench_t2i.py" in p.command for r in csv_rows(p.stdout, "preset")}

    def ms(preset, batch, mode="cfg", engine="ours", tokens=TOKENS):
        r = gen.get((preset, tokens, batch, mode, engine))
        return None if r is None else float(r["ms_per_step"])

    def ratio(num, den):
        return None if num is None or den is None else num / den

    xl64 = gen.get(("GPT-XL", TOKENS, 64, "cfg", "ours"))
    checks = [
        ("GPT-XL b8 CFG ms/step", ms("GPT-XL", 8), "<=", 1.0),
        ("GPT-XL b8 CFG: compiled LlamaGen ms/step / ours", ratio(ms("GPT-XL", 8, engine="baseline-compiled"),
                                                                  ms("GPT-XL", 8)), ">=", 2.7),
        ("GPT-XL b64 CFG ms/step", ms("GPT-XL", 64), "<=", 2.3),
        ("GPT-XL b64 CFG % of the bandwidth floor", None if xl64 is None else float(xl64["pct_of_floor"]), ">=", 65),
        ("GPT-B b1 CFG ms/step", ms("GPT-B", 1), "<=", 0.30),
        ("GPT-XL b1 CFG ms/step", ms("GPT-XL", 1), "<=", 1.0),
        ("CoRe^2 fast / CFG images/s, GPT-XL b64 x 256", ratio(ms("GPT-XL", 64), ms("GPT-XL", 64, "fast")), ">=", 1.4),
        ("CoRe^2 fast / CFG images/s, GPT-XL b64 x 576", ratio(ms("GPT-XL", 64, tokens=576),
                                                             ms("GPT-XL", 64, "fast", tokens=576)), ">=", 1.5),
        ("T2I GPT-XL 512 px b8 CoRe^2 slow, s/image incl. VQ decode",
         float(t2i["slow"]["seconds_per_image"]) if "slow" in t2i else None, "<=", 1.0),
        ("first-call warm-up of a new shape (all CUDA graphs of a GPT-XL b64 CFG run), s",
         None if xl64 is None else float(xl64["warmup_s"]), "<=", 5.0),
    ]
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for name, value, op, goal in checks:
        met = "–" if value is None else ("yes" if (value <= goal if op == "<=" else value >= goal) else "no")
        lines.append(f"| {name} | {'not measured' if value is None else _num(value, 3)} | {op} {goal} | {met} |")
    return lines


def jacobi_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["Not measured (the phase produced no rows; see its exit status above)."]
    lines = ["| batch | decoding | img/s | forward passes | ms/pass | projected img/s | warm-up s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['decoding']} | {_num(r['images_per_s'])} | {r['forward_passes']} | "
                     f"{_num(r['ms_per_pass'])} | {_num(r.get('projected_images_per_s'))} | {_num(r['warmup_s'])} |")
    return lines


def kernel_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["Not measured (the phase produced no rows; see its exit status above)."]
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((int(r["batch"]), int(r["top_k"]), float(r["top_p"])), {})[r["impl"]] = r
    lines = ["| batch | top_k / top_p | fused µs | fused_graph µs | select share µs (graph) | torchsel_graph µs | "
             "torch µs | chain µs | graph speedup vs chain |", "|---|---|---|---|---|---|---|---|---|"]
    for (batch, k, p), impls in sorted(by_key.items()):
        us = {name: _num(impls[name]["us_per_call"], 1) if name in impls else "–"
              for name in ("fused", "fused_graph", "torchsel_graph", "torch", "chain")}
        base = by_key.get((batch, 0, 1.0), {}).get("fused_graph")
        share = "–"
        if "fused_graph" in impls and base is not None and (k, p) != (0, 1.0):
            share = _num(float(impls["fused_graph"]["us_per_call"]) - float(base["us_per_call"]), 1)
        speed = _num(impls["fused_graph"]["speedup_vs_chain"], 2) + "x" if "fused_graph" in impls else "–"
        lines.append(f"| {batch} | {k} / {p} | {us['fused']} | {us['fused_graph']} | {share} | "
                     f"{us['torchsel_graph']} | {us['torch']} | {us['chain']} | {speed} |")
    return lines


def profile_table(stderr: str) -> list[str]:
    """The markdown table(s) bench_generate.py --profile printed to stderr ('# profile ...' + table rows)."""
    lines, inside = [], False
    for line in stderr.splitlines():
        if line.startswith("# profile "):
            lines += ["", line[2:], ""]
            inside = True
        elif inside and line.startswith("|"):
            lines.append(line)
        elif inside and line.strip() and not line.startswith("|"):
            inside = False
    return lines[1:] if lines else ["Not measured (the phase printed no profile; see its exit status above)."]


def generate_table(phases: list[Phase], args, planned: list[str]) -> list[str]:
    rows = [r for p in phases if p.name.startswith("generate") for r in csv_rows(p.stdout, "engine")]
    engines = sorted(set(planned) | {r["engine"] for r in rows}, key=lambda e: (e != "ours", e))
    got = {(r["preset"], int(r["batch"]), r["mode"], r["engine"]): r for r in rows}
    header = ["preset", "batch", "mode", "floor ms/step"] + [f"{e} ms/step (img/s)" for e in engines] + \
        ["ours % of floor"] + [f"ours vs {e}" for e in engines if e != "ours"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    missing = []
    for preset in args.presets:
        for batch in sorted(args.batches):
            for mode in args.modes:
                cells = {e: got.get((f"GPT-{preset}", batch, mode, e)) for e in engines}
                if not any(cells.values()):
                    missing.append((preset, batch, mode))
                    continue
                floor = next((c["floor_ms_per_step"] for c in cells.values() if c), None)
                line = [f"GPT-{preset}", str(batch), mode, _num(floor, 3)]
                for e in engines:
                    c = cells[e]
                    line.append("not measured" if c is None else
                                (c["status"] if c["status"] != "ok" else
                                 f"{_num(c['ms_per_step'])} ({_num(c['images_per_s'], 2)})"))
                ours = cells.get("ours")
                ok = ours is not None and ours["status"] == "ok"
                line.append(_num(ours["pct_of_floor"], 1) + "%" if ok else "–")
                for e in engines:
                    if e == "ours":
                        continue
                    base = cells[e]
                    both = ok and base is not None and base["status"] == "ok"
                    line.append(f"{float(base['ms_per_step']) / float(ours['ms_per_step']):.2f}x" if both else "–")
                lines.append("| " + " | ".join(line) + " |")
    unmeasured = [(p, b, m, e) for p in args.presets for b in args.batches for m in args.modes
                  for e in engines if (f"GPT-{p}", b, m, e) not in got]
    if unmeasured:
        def values(k):
            return " ".join(map(str, sorted({u[k] for u in unmeasured})))
        lines += ["", f"Not measured within the budget ({len(unmeasured)} engine x configuration pairs): "
                  f"{', '.join(f'{e} GPT-{p} b{b} {m}' for p, b, m, e in unmeasured[:12])}"
                  f"{' ...' if len(unmeasured) > 12 else ''}. Measure them with:",
                  f"`python benchmarks/bench_generate.py --device cuda --dtype bf16 --tokens {TOKENS} --preset "
                  f"{values(0)} --batch {values(1)} --modes {values(2)} --engines {values(3)}`"]
    if missing:
        lines += ["", f"No engine measured: {', '.join(f'GPT-{p} b{b} {m}' for p, b, m in missing)}."]
    return lines


def environment(command: str) -> dict:
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    major, minor = torch.cuda.get_device_capability(0)
    return dict(gpu=torch.cuda.get_device_name(0), capability=f"{major}.{minor}", torch=torch.__version__,
                cuda=torch.version.cuda, triton=triton_version, python=sys.version.split()[0],
                date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), command=command)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget-s", type=float, default=450.0, help="seconds for all phases together")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), help="bench_generate presets")
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), help="batch sizes, in priority order")
    p.add_argument("--modes", nargs="+", default=list(MODES), help="guidance modes, in priority order")
    p.add_argument("--engines", nargs="+", default=None,
                   help="bench_generate engines (default: every choice bench_generate.py offers)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the gpu tests")
    p.add_argument("--skip-kernels", action="store_true", help="do not run bench_kernels.py")
    p.add_argument("--skip-generate", action="store_true", help="do not run bench_generate.py")
    p.add_argument("--skip-jacobi", action="store_true", help="do not run bench_jacobi_throughput.py")
    p.add_argument("--out", default=None, help="report path (default: benchmarks/results/gpu_report_<date>_<gpu>.md)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (works without CUDA)")
    args = p.parse_args(argv)
    command = " ".join(["python", "benchmarks/gpu_report.py", *map(shlex.quote, argv if argv is not None
                                                                      else sys.argv[1:])])
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_report: CUDA is not available (torch {torch.__version__}); this report needs an NVIDIA GPU "
              f"-- nothing was run or written", file=sys.stderr)
        return 2
    started = time.perf_counter()
    deadline = started + args.budget_s
    engines = args.engines or discover_engines()
    phases = plan(args, engines)
    if args.dry_run:
        print(f"gpu_report plan: {len(phases)} phases in a {args.budget_s:.0f} s budget (each phase stopped at its "
              f"deadline, so all of them within {args.budget_s / 60:.1f} min; + start-up: reading the engines and the "
              f"environment, ~10-30 s)")
        for phase, seconds in budget_plan(phases, args.budget_s):
            print(f"{phase.name}: at least {seconds:.0f} s ({phase.share:.0%} of the time left): {phase.command}")
        return 0
    meta = environment(command)
    meta["engines"] = engines
    for phase in phases:
        left = deadline - time.perf_counter()
        if left < 5:
            break
        run_phase(phase, phase_slice(phase, phases, left))
        print(f"gpu_report: {phase.name}: {'stopped at its deadline' if phase.timed_out else f'exit {phase.rc}'} "
              f"after {phase.seconds:.0f} s", file=sys.stderr, flush=True)
    meta["elapsed"] = time.perf_counter() - started
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["gpu"]).strip("-")
    out = Path(args.out) if args.out else BENCH / "results" / f"gpu_report_{meta['date'][:10]}_{slug}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(meta, phases, args))
    print(f"gpu_report: wrote {out} in {meta['elapsed']:.0f} s")
    return 0 if all(ph.rc in (0, None) for ph in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
