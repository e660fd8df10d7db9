"""Static resource report of the fused sampling kernels for an H100 (sm_90a), no GPU needed.

Compiles `_mix_race_kernel` and `_select_kernel` through Triton and ptxas with the launch settings
`launch_config` picks on an H100 (132 SMs) and the specialisations the launcher would apply
(16-byte aligned tensors, V divisible by 16), then reads back per kernel: registers per thread,
stack bytes per thread (ptxas spills), SASS instructions, and for the mix/race kernel the
instructions per logit it handles (one loop step over CHUNK columns). This is the cost model's
input in docs/sampling.md; timings need a GPU (benchmarks/bench_kernels.py).

    python benchmarks/kernel_resources.py                     # batch 1, 64, 256 at V = 16384
    python benchmarks/kernel_resources.py --batches 8 --vocab 65536 --dtype bf16

The select kernel is reported per filter variant (top-k, top-p, both, the torch thresholds path).

tests/test_kernels.py compiles the kernels through `compile_kernel` too (without a GPU).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU even where the tests interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llamagen_core2.kernels import fused_guided_sample as F  # noqa: E402

H100_SMS = 132
TARGET = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {"part_i_ptr": "*i32", "seeds_ptr": "*i64", "offset_ptr": "*i64", "top_k_ptr": "*i64",
                 "tokens_ptr": "*i64", "threshold_ptr": "*i32"}
SCALAR_TYPES = {"offset_val": "i64", "top_k_val": "i32"}


def compile_kernel(fn, consts: dict, num_warps: int, logits_dtype: str = "fp32", vocab: int = 16384):
    """triton.compile for sm_90a with the launcher's specialisations; FMA contraction off, as launched."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + logits_dtype if name in ("cond_ptr", "uncond_ptr", "weak_ptr") else \
                POINTER_TYPES.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = SCALAR_TYPES.get(name, "fp32" if name.endswith("_val") else "i32")
            if name == "vocab" and vocab % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs=consts, attrs=attrs), target=TARGET,
                          options={"num_warps": num_warps, "enable_fp_fusion": False})


def mix_consts(config: "F.LaunchConfig", **flags) -> dict:
    """The benchmark's call by default: CFG, Python-number knobs, temperature 1, device offset, top-k (rows
    stored for the select, no x argmax: that one is for greedy rows and top-p)."""
    consts = dict(MODE=1, CFG_MIX=True, KNOBS_PER_ROW=False, OFFSET_FROM_PTR=True, WRITE_MIXED=False,
                  SCALE=False, ARGMAX_X=False, SAMPLE=True, STORE_ROWS=True)
    consts.update(flags)
    consts.update(BLOCK_ROWS=config.rows_per_program, CHUNK=config.chunk, CHUNKS=config.chunks_per_block)
    return consts


def select_consts(config: "F.LaunchConfig", vocab: int, **flags) -> dict:
    """The benchmark's call by default: Python-number knobs, top-k on, top-p off, the kernel select path."""
    consts = dict(KNOBS_PER_ROW=False, GREEDY=False, SAMPLE=True, TOPK=True, TOPP=False, THRESHOLD=False)
    consts.update(flags)
    consts.update(BLOCK_ROWS=config.rows_per_program, BLOCK_V=triton.next_power_of_2(vocab),
                  BLOCK_NB=triton.next_power_of_2(config.blocks_per_row), SCAN=config.scan_chunk,
                  RESIDENT=config.resident, MAX_REJECTIONS=config.rejection_rounds, VALUE_STEPS=config.value_steps)
    return consts


def h100_config(batch: int, vocab: int) -> "F.LaunchConfig":
    """launch_config as it decides on an H100, without one."""
    real = F.multiprocessor_count
    F.multiprocessor_count = lambda device: H100_SMS
    try:
        return F.launch_config(batch, vocab, "cuda")
    finally:
        F.multiprocessor_count = real


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resources(kernel) -> dict:
    """Registers and stack bytes per thread (cuobjdump) and the SASS instruction count (nvdisasm)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, re.M))
    return dict(registers=int(regs.group(1)) if regs else None, stack_bytes=int(stack.group(1)) if stack else None,
                sass_instructions=instructions)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    args = ap.parse_args(argv)
    if "nvidia" not in triton.backends.backends:
        print("triton has no nvidia backend here", file=sys.stderr)
        return 1
    print("batch,vocab,kernel,launch,num_warps,registers,stack_bytes,sass_instructions,instructions_per_logit")
    for batch in (int(b) for b in args.batches.split(",")):
        config = h100_config(batch, args.vocab)
        launch = f"rows={config.rows_per_program} blocks={config.blocks_per_row} chunk={config.chunk}x{config.chunks_per_block}"
        mix = resources(compile_kernel(F._mix_race_kernel, mix_consts(config), config.mix_warps, args.dtype,
                                       args.vocab))
        # per logit: the per-element code is unrolled over a loop step, so doubling CHUNK adds
        # exactly one step's worth of logits per thread
        double = resources(compile_kernel(F._mix_race_kernel, dict(mix_consts(config), CHUNK=2 * config.chunk),
                                          config.mix_warps, args.dtype, args.vocab))
        per_thread = config.chunk * config.rows_per_program / (32 * config.mix_warps)
        per_logit = (double["sass_instructions"] - mix["sass_instructions"]) / per_thread
        print(f"{batch},{args.vocab},mix_race,{launch},{config.mix_warps},{mix['registers']},{mix['stack_bytes']},"
              f"{mix['sass_instructions']},{per_logit:.0f}")
        for name, flags in SELECT_VARIANTS.items():
            select = resources(compile_kernel(F._select_kernel, select_consts(config, args.vocab, **flags),
                                              config.select_warps, vocab=args.vocab))
            print(f"{batch},{args.vocab},{name},{launch} resident={config.resident},{config.select_warps},"
                  f"{select['registers']},{select['stack_bytes']},{select['sass_instructions']},")
    return 0


# the select kernel as the filter flags compile it (Python-number knobs): the rejection select for top-k, top-p
# and both, and the torch select path (thresholds given)
SELECT_VARIANTS = {"select(top-k)": dict(TOPK=True, TOPP=False), "select(top-p)": dict(TOPK=False, TOPP=True),
                   "select(top-k+top-p)": dict(TOPK=True, TOPP=True),
                   "select(torch thresholds)": dict(TOPK=True, TOPP=True, THRESHOLD=True)}


if __name__ == "__main__":
    raise SystemExit(main())
