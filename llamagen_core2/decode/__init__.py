"""Decoding image tokens: the model, its KV cache, the block ops and the decode engine (docs/design.md#decode-engine).

    op_checks.py      argument checks of the block ops, shared by the torch references and the Triton kernels
    block_ops.py      the block's non-GEMM ops: torch references + the dispatch to kernels/
    kv_cache.py       the caller-owned KV cache
    model.py          GPT (LlamaGen's layout), the one block forward `run_blocks`, 2D RoPE
    decode_ops.py     the fused decode-layer kernels chosen per trunk shape
    step.py           what every decoding loop shares (the logits a mode samples from, catch-up prefill, stats)
    engine.py         `Engine`: the caller-owned decoding state and the fixed-shape step of every mode
    static_decode.py  CUDA-graph capture and replay of chunks of steps
    jacobi.py         Jacobi decoding: the sequential tokens in fewer forward passes
    generate.py       `generate()`: the entry (checks, seeds, engine choice) and the eager loop
    memory.py         memory estimates and refusals
"""
