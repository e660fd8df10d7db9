"""Static resource report of the fused sampling kernels and the decode-layer kernels for an H100 (sm_90a), no GPU
needed.

Compiles `_mix_race_kernel` and `_select_kernel` through Triton and ptxas with the launch settings
`launch_config` picks on an H100 (132 SMs) and the specialisations the launcher would apply
(16-byte aligned tensors, V divisible by 16), then reads back per kernel: registers per thread,
stack bytes per thread (ptxas spills), SASS instructions, and for the mix/race kernel the
instructions per logit it handles (one loop step over CHUNK columns). This is the cost model's
input in docs/sampling.md; timings need a GPU (benchmarks/bench_kernels.py).

    python benchmarks/kernel_resources.py                     # batch 1, 64, 256 at V = 16384
    python benchmarks/kernel_resources.py --batches 8 --vocab 65536 --dtype bf16

The select kernel is reported per filter variant (top-k, top-p, both, the torch thresholds path).

`--block` reports the decode layer's kernels instead (docs/decode_kernels.md): the fused add+RMSNorm+wqkv+RoPE+KV
write, the fused add+RMSNorm+[w1;w3]+SwiGLU, the skinny split-K GEMM (wo, w2) and decode attention, at the
issue's shapes (GPT-B 2 rows, GPT-XL 16 and 128 rows, 257 cache positions). Their launchers run on meta tensors
with the Triton kernels replaced by recorders (`record_launches`), so the report compiles exactly the arguments,
constexprs, launch options and JIT specialisations (ints == 1 constant, divisibility by 16) of a GPU launch
with gemm_config / launch_config as they decide on 132 SMs; the shared-memory column is Triton's.

    python benchmarks/kernel_resources.py --block --dtype bf16

tests/test_kernels.py and tests/test_fused_decode_kernels.py compile the kernels through these helpers too.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

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


# ---------------------------------------------------------------------- decode-layer kernels (--block)
BLOCK_SHAPES = (("GPT-B", 2), ("GPT-XL", 16), ("GPT-XL", 128))  # b1 CFG, b8 CFG, b64 CFG
CACHE_LEN = 257  # 256 image tokens + the class token
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class Launch(NamedTuple):
    fn: object
    grid: tuple
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


class _Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kwargs) records what a launch would compile."""

    def __init__(self, fn, launches: list, overrides: dict):
        self.fn, self.launches, self.overrides = fn, launches, overrides

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self._launch(grid, args, kwargs))

    def _launch(self, grid, args, kwargs) -> Launch:
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.runtime.jit import native_specialize_impl

        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
        signature, constexprs, attrs = {}, {}, {}
        names = self.fn.arg_names
        values = {**dict(zip(names, args)), **kwargs, **{k: v for k, v in self.overrides.items() if k in names}}
        for i, name in enumerate(names):
            value = values[name]
            if name in kwargs or name in self.overrides:
                signature[name], constexprs[name] = "constexpr", value
                continue
            kind, spec = native_specialize_impl(CUDABackend, value, False, True, True)
            if kind == "constexpr":  # an int equal to 1, as the JIT specialises it
                signature[name], constexprs[name] = "constexpr", value
                continue
            signature[name] = kind
            if spec:
                attrs[(i,)] = CUDABackend.parse_attr(spec)
        return Launch(self.fn, tuple(grid), signature, constexprs, attrs, options)


def record_launches(module, launcher, *args, overrides: Optional[dict] = None, **kwargs) -> list:
    """Calls `launcher` with every @triton.jit kernel of `module` replaced by a recorder -> [Launch]. Run it on
    meta tensors: nothing executes. `overrides`: constexprs a GPU launch would set differently (LIBDEVICE_EXP)."""
    launches, saved = [], {}
    for name, value in vars(module).items():
        if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
            saved[name] = value
    try:
        for name, fn in saved.items():
            setattr(module, name, _Recorder(fn, launches, overrides or {}))
        launcher(*args, **kwargs)
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
    return launches


def compile_launch(launch: Launch):
    options = {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": True, **launch.options}
    return triton.compile(ASTSource(launch.fn, launch.signature, constexprs=launch.constexprs, attrs=launch.attrs),
                          target=TARGET, options=options)


def block_launches(preset: str, rows: int, dtype: str = "bf16", sm_count: int = H100_SMS) -> list:
    """[(op, Launch)] of one decode layer of `preset` at `rows` cache rows: fused QKV, decode attention (split
    and combine as launch_config picks them on `sm_count` SMs), wo, fused W1|W3, w2."""
    import torch

    from llamagen_core2.config import GPTConfig
    from llamagen_core2.kernels import decode_attention as A, norm_qkv_rope as Q, norm_w13_swiglu as W, \
        skinny_gemm as G

    c = GPTConfig.from_preset(preset)
    d, H, D, F = c.dim, c.n_head, c.head_dim, c.ffn_dim
    dt = getattr(torch, TORCH_DTYPES[dtype])
    meta = dict(device="meta", dtype=dt)
    x, residual = torch.empty(rows, 1, d, **meta), torch.empty(rows, 1, d, **meta)
    norm_weight = torch.empty(d, **meta)
    cache_k, cache_v = torch.empty(rows, H, CACHE_LEN, D, **meta), torch.empty(rows, H, CACHE_LEN, D, **meta)
    rope = torch.empty(CACHE_LEN, D // 2, 2, device="meta")
    position = torch.empty(1, dtype=torch.int64, device="meta")
    size = torch.empty(0, dtype=dt).element_size()
    out = []

    def config(units, K, per_unit):
        return G.gemm_config(rows, units, K, True, sm_count, weight_rows_per_unit=per_unit, element_size=size)

    for launch in record_launches(Q, Q.norm_qkv_rope_triton, x, residual, norm_weight, 1e-5,
                                  torch.empty(3 * d, d, **meta), rope, position, cache_k, cache_v, 0,
                                  config=config(3 * d // 2, d, 2)):
        out.append(("norm_qkv_rope", launch))
    splits = A.launch_config(rows, H, CACHE_LEN, D, True, sm_count)[0]
    q = torch.empty(rows, H, 1, D, **meta)
    for launch in record_launches(A, A.decode_attention_triton, q, cache_k, cache_v, 0, position, None, CACHE_LEN,
                                  num_splits=splits):
        out.append(("decode_attention", launch))
    for launch in record_launches(G, G.skinny_linear_triton, x, torch.empty(d, d, **meta), config=config(d, d, 1)):
        out.append(("wo", launch))
    for launch in record_launches(W, W.norm_w13_swiglu_triton, x, residual, norm_weight, 1e-5,
                                  torch.empty(2 * F, d, **meta), config=config(F, d, 2),
                                  overrides={"LIBDEVICE_EXP": True}):
        out.append(("norm_w13_swiglu", launch))
    for launch in record_launches(G, G.skinny_linear_triton, torch.empty(rows, 1, F, **meta),
                                  torch.empty(d, F, **meta), config=config(d, F, 1)):
        out.append(("w2", launch))
    return out


def block_report(dtype: str, shapes=BLOCK_SHAPES) -> list[dict]:
    rows_out = []
    for preset, rows in shapes:
        for op, launch in block_launches(preset, rows, dtype):
            kernel = compile_launch(launch)
            consts = {k: v for k, v in launch.constexprs.items() if k.isupper()}
            rows_out.append(dict(op=op, preset=preset, rows=rows, dtype=dtype, kernel=launch.fn.__name__,
                                 grid="x".join(map(str, launch.grid)),
                                 constexprs=" ".join(f"{k}={v}" for k, v in consts.items()),
                                 num_warps=launch.options.get("num_warps", 4),
                                 num_stages=launch.options.get("num_stages", 3),
                                 shared_bytes=kernel.metadata.shared, **resources(kernel)))
    return rows_out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--block", action="store_true", help="report the decode layer's kernels instead of the sampler")
    args = ap.parse_args(argv)
    if "nvidia" not in triton.backends.backends:
        print("triton has no nvidia backend here", file=sys.stderr)
        return 1
    if args.block:
        ptxas = triton.knobs.nvidia.ptxas
        print(f"# ptxas {ptxas.version} ({ptxas.path}; TRITON_PTXAS_PATH picks another), triton {triton.__version__}",
              file=sys.stderr)
        fields = ["op", "preset", "rows", "dtype", "kernel", "grid", "num_warps", "num_stages", "registers",
                  "stack_bytes", "shared_bytes", "sass_instructions", "constexprs"]
        print(",".join(fields))
        for row in block_report(args.dtype):
            print(",".join(str(row[f]) for f in fields), flush=True)
        return 0
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
