"""Decoding image tokens: the model, its KV cache, the block ops and the decode engine (docs/design.md#decode-engine).

    block_ops.py      the block's non-GEMM ops: torch references + the dispatch to kernels/
    model.py          GPT (LlamaGen's layout), the one block forward `run_blocks`, 2D RoPE, the KV cache
    decode_ops.py     the fused decode-layer kernels chosen per trunk shape
    engine.py         `Engine`: the caller-owned decoding state and the fixed-shape step of every mode
    static_decode.py  CUDA-graph capture and replay of chunks of steps
    jacobi.py         Jacobi decoding: the sequential tokens in fewer forward passes
    generate.py       `generate()`: the entry (checks, seeds, engine choice) and the eager loop
    memory.py         memory estimates and refusals
"""
