"""How many device operations one decode step dispatches per transformer layer: <= 6 with the fused decode-layer
kernels (5 when attention is not split), <= 10 on the unfused path the timed choice falls back to.

Counted on CPU with the Triton kernels under the interpreter (LLAMAGEN_CORE2_KERNELS=triton): every aten op the
step dispatches except views and allocations (they launch no kernel on a GPU), plus one per Triton launch (the
aten ops the interpreter itself uses to move tensors in and out are not counted). The per-layer figure is the
difference between a 4-layer and a 2-layer model, divided by 2, so per-step work (embedding, head, sampler)
cancels out. The decode attention is forced to 3 KV splits, so its combine launch is counted as on a GPU at
small batch (GPT-B at 2 rows); unsplit (GPT-XL at 16 and 128 rows) it is one launch less.
"""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llamagen_core2.decode.decode_ops import DecodeOps
from llamagen_core2.decode.engine import Engine
from llamagen_core2.decode.generate import generate
from llamagen_core2.kernels import dispatch
from tiny_models import tiny_gpt

interpreter = pytest.importorskip("triton.runtime.interpreter")
attention_kernel = pytest.importorskip("llamagen_core2.kernels.decode_attention")
if not attention_kernel.INTERPRETED:
    pytest.skip("counts interpreted launches; on a GPU use benchmarks/bench_generate.py --count-kernels",
                allow_module_level=True)

NO_KERNEL = {"aten.empty.memory_format", "aten.empty_like.default", "aten.empty_strided.default",
             "aten.promote_types.default", "aten.detach_.default"}  # allocations, metadata: no device launch


class CountLaunches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.inside_triton = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_triton and not func.is_view and str(func) not in NO_KERNEL:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counter(monkeypatch):
    mode = CountLaunches()
    run = interpreter.InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        mode.ops["triton:" + self.fn.__name__] += 1
        mode.inside_triton = True
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.inside_triton = False

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted_run)
    config = attention_kernel.launch_config
    monkeypatch.setattr(attention_kernel, "launch_config", lambda *a, **k: (3,) + config(*a, **k)[1:])
    return mode


def decode_step_ops(counter, n_layer: int, backend: str = "triton", fused: bool = False) -> Counter:
    from llamagen_core2.kernels.skinny_gemm import SplitKWorkspace

    gpt = tiny_gpt(n_layer=n_layer)
    cache = gpt.new_cache(4)
    ops = DecodeOps(True, True, True, True, workspace=SplitKWorkspace()) if fused else None
    with torch.inference_mode():
        gpt.forward_hidden(gpt.condition_embeddings(torch.tensor([1, 2, 3, 4])), cache)
        x = gpt.embed_tokens(torch.tensor([5, 6, 7, 8]))[:, None]
        counter.ops.clear()
        with counter:
            gpt.forward_hidden(x, cache, position=torch.tensor([1]), max_end=cache.max_len, backend=backend,
                               decode_ops=ops)
    return Counter(counter.ops)


def per_layer_ops(counter, **kwargs) -> dict:
    two, four = decode_step_ops(counter, 2, **kwargs), decode_step_ops(counter, 4, **kwargs)
    return {op: (four[op] - two[op]) / 2 for op in four if four[op] != two[op]}


FUSED_LAYER = {"triton:_norm_qkv_rope_kernel": 1, "triton:_decode_attention_split_kernel": 1,
               "triton:_decode_attention_combine_kernel": 1, "triton:_skinny_gemm_kernel": 2,
               "triton:_norm_w13_swiglu_kernel": 1}


def test_fused_decode_step_is_six_launches_per_layer_and_five_unsplit(counter, monkeypatch):
    """The step with every fused kernel chosen: norm_qkv_rope, attention (+ combine when split), the skinny wo,
    norm_w13_swiglu, the skinny W2 -- nothing else per layer (the attention output reshape is a view)."""
    per_layer = per_layer_ops(counter, fused=True)
    assert per_layer == FUSED_LAYER and sum(per_layer.values()) == 6, per_layer
    config = attention_kernel.launch_config
    monkeypatch.setattr(attention_kernel, "launch_config", lambda *a, **k: (1,) + config(*a, **k)[1:])
    per_layer = per_layer_ops(counter, fused=True)
    unsplit = {op: n for op, n in FUSED_LAYER.items() if "combine" not in op}
    assert per_layer == unsplit and sum(per_layer.values()) == 5, per_layer


def test_decode_step_is_at_most_ten_launches_per_layer(counter):
    """The unfused step (what the guard keeps where a fused kernel measured slower)."""
    per_layer = per_layer_ops(counter)
    assert sum(per_layer.values()) <= 10, per_layer
    # and it is the fused block: 4 GEMMs and the five/six fused launches, nothing else per layer
    assert per_layer == {"aten.linear.default": 4, "triton:_add_rmsnorm_kernel": 2, "triton:_rope_kv_write_kernel": 1,
                         "triton:_decode_attention_split_kernel": 1, "triton:_decode_attention_combine_kernel": 1,
                         "triton:_swiglu_kernel": 1}, per_layer


def test_the_count_sees_the_unfused_reference_path(counter):
    """The same count on the torch references (what the step was before the kernels) is far above 10."""
    two, four = decode_step_ops(counter, 2, "torch"), decode_step_ops(counter, 4, "torch")
    assert (sum(four.values()) - sum(two.values())) / 2 > 25, four


def engine_step_ops(counter, n_layer: int, mode: str, decoding: str = "sequential") -> int:
    """Ops of one whole engine decode step (the thing a CUDA graph replays): embedding, the base forward, the
    weak model (fast/slow), the head, the fused sampler, the token write-back and the counters. decoding="jacobi":
    one window pass of 4 positions (jacobi._window_pass: the window's inputs, the forward, sampling and the
    acceptance on the device)."""
    from llamagen_core2.core2.weak_model import WeakModel
    from llamagen_core2.decode import jacobi

    gpt = tiny_gpt(n_layer=n_layer)
    weak = WeakModel.for_base(gpt, "W-1", dim=32, n_head=4, fingerprint=False)
    engine = Engine(gpt, backend="triton")
    counts = []

    def counted(step):
        def run(*args, **kwargs):
            counter.ops.clear()
            with counter:
                step(*args, **kwargs)
            counts.append(sum(counter.ops.values()))
        return run

    with pytest.MonkeyPatch.context() as patch:
        if decoding == "jacobi":
            patch.setattr(jacobi, "_window_pass", counted(jacobi._window_pass))
        else:
            patch.setattr(engine, "_step", counted(engine._step))
        with torch.inference_mode():
            generate(gpt, torch.tensor([1, 2]), mode=mode, weak_model=weak, num_tokens=3 if decoding != "jacobi"
                     else 16, seed=0, engine=engine, top_k=0, decoding=decoding, jacobi_window=4)
    assert len(counts) >= 2 and counts[0] == counts[1], counts
    return counts[0]


@pytest.mark.parametrize("mode", ["cond", "cfg", "fast", "slow"])
def test_whole_engine_step_is_the_fused_layers_plus_a_few_launches(counter, mode):
    two, four = engine_step_ops(counter, 2, mode), engine_step_ops(counter, 4, mode)
    per_layer = (four - two) / 2
    assert per_layer <= 10
    weak_layers = 1 if mode in ("fast", "slow") else 0  # W-1: one fused block + its in/out projections
    per_step = two - 2 * per_layer - weak_layers * (per_layer + 6)
    # embedding, final norm, the NaN flag over the base rows (and the weak prediction), the rows -> one head GEMM
    # (a cat when the weak prediction joins them), the fused sampler (2), token write-back (2), counters (1)
    assert per_step <= 16, per_step


@pytest.mark.parametrize("mode, decoding", [("cfg", "sequential"), ("fast", "sequential"), ("cfg", "jacobi")])
def test_whole_engine_step_with_the_fused_kernels(counter, monkeypatch, mode, decoding):
    """LLAMAGEN_CORE2_KERNELS=triton forces the fused kernels (the guard's triton candidates) for every trunk shape:
    the CFG step (4 rows), the fast step (2 rows + the weak model's own trunk, with its own decisions) and a
    Jacobi window pass of 4 positions (8 rows; attention through SDPA with the device-built mask)."""
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    two, four = engine_step_ops(counter, 2, mode, decoding), engine_step_ops(counter, 4, mode, decoding)
    per_layer = (four - two) / 2
    # a step: the six fused launches; a window pass: norm_qkv_rope, SDPA (one aten op; its output is laid out
    # [R, W, H, D], so the reshape for wo is a view), skinny wo, norm_w13_swiglu, skinny W2
    assert per_layer == (5 if decoding == "jacobi" else 6), per_layer
    weak_layers = 1 if mode == "fast" else 0  # W-1: one fused block + its in/out projections, skip, final norm
    per_step = two - 2 * per_layer - weak_layers * (per_layer + 6)
    # per step: embedding, final norm, NaN flag, head GEMM, sampler (2), token write-back (2), counters (1)...;
    # per window pass also the window's inputs, the per-position noise offsets and the acceptance on the device
    assert per_step == {("cfg", "sequential"): 11, ("fast", "sequential"): 14, ("cfg", "jacobi"): 63}[
        (mode, decoding)], per_step
