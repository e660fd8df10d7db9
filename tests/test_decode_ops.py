"""The fused decode-layer kernels in the decode step (issue 21, phase 2): the block_ops entry points, the timed choice
per trunk shape (llamagen_core2/decode/decode_ops.py through kernels.dispatch.choose_decode_op), the engine deciding
before any capture with the flags in the graph keys, the split-K workspace sized before capture, and fp16 refused by the
fused add+RMSNorm GEMMs.

On CPU the kernels run under the Triton interpreter (fp32); the guard never times on a CPU, so its decisions are
tested with a fake timer on a CUDA device object that is never touched (only its type is looked at), and the
engine's use of them with stand-in decisions on CPU tensors."""
import logging
import warnings

import pytest
import torch

from llamagen_core2.decode import block_ops, decode_ops, op_checks
from llamagen_core2.decode.decode_ops import DecodeOps, LayerShape
from llamagen_core2.decode.engine import Engine
from llamagen_core2.decode.generate import generate
from llamagen_core2.errors import InvalidArgument
from llamagen_core2.kernels import dispatch
from llamagen_core2.kernels.timed_choice import Candidate, TimedChoice
from tiny_models import captions, tiny_gpt

gemm = pytest.importorskip("llamagen_core2.kernels.skinny_gemm")
if not gemm.INTERPRETED:
    pytest.skip("CPU tests of the interpreted kernels; on a GPU see tests/test_gpu.py", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("single_thread")
CUDA = torch.device("cuda", 0)  # never touched: the fake timer runs nothing on it
ALL = (True, True, True, True)


@pytest.fixture(autouse=True)
def auto_kernels(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")


def weak_for(model):
    from llamagen_core2.core2.weak_model import WeakModel

    weak = WeakModel.for_base(model, "W-1", dim=32, n_head=4, fingerprint=False).eval()
    with torch.no_grad():  # leave the residual start so the weak prediction differs from the cond output
        for p in weak.parameters():
            p.normal_(0, 0.05)
    return weak


# ---------------------------------------------------------------------- block_ops entry points

def test_entry_points_dispatch_to_the_kernels_and_the_references():
    g = torch.Generator().manual_seed(0)
    R, L, d, H, D, F_ = 3, 2, 40, 2, 8, 24
    x, residual = torch.randn(R, L, d, generator=g), torch.randn(R, L, d, generator=g)
    norm_weight = torch.randn(d, generator=g)
    wqkv, w13 = torch.randn(3 * H * D, d, generator=g) * d ** -0.5, torch.randn(2 * F_, d, generator=g) * d ** -0.5
    w2 = torch.randn(d, F_, generator=g) * F_ ** -0.5
    rope, positions = torch.randn(12, D // 2, 2, generator=g), torch.tensor([5, 6])
    workspace = gemm.SplitKWorkspace()
    caches = {backend: (torch.zeros(R, H, 9, D), torch.zeros(R, H, 9, D)) for backend in op_checks.BACKENDS}
    out = {backend: (block_ops.skinny_linear(x[..., :F_].contiguous(), w2, backend=backend, workspace=workspace),
                     block_ops.norm_qkv_rope(x, residual, norm_weight, 1e-5, wqkv, rope, positions, *caches[backend],
                                             0, backend=backend, workspace=workspace),
                     block_ops.norm_w13_swiglu(x, residual, norm_weight, 1e-5, w13, backend=backend,
                                               workspace=workspace))
           for backend in op_checks.BACKENDS}
    # the torch path is the reference, bit for bit
    assert torch.equal(out["torch"][0], block_ops.skinny_linear_reference(x[..., :F_], w2))
    ref_cache = torch.zeros(R, H, 9, D), torch.zeros(R, H, 9, D)
    q, h = block_ops.norm_qkv_rope_reference(x, residual, norm_weight, 1e-5, wqkv, rope, positions, *ref_cache, 0)
    assert torch.equal(out["torch"][1][0], q) and torch.equal(out["torch"][1][1], h)
    assert torch.equal(caches["torch"][0], ref_cache[0]) and torch.equal(caches["torch"][1], ref_cache[1])
    # the kernels agree with it to fp32 rounding (tolerances: tests/test_fused_decode_kernels.py)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], **tol)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], **tol)
    torch.testing.assert_close(out["triton"][2], out["torch"][2], **tol)
    for got, want in zip(caches["triton"], caches["torch"]):
        torch.testing.assert_close(got, want, **tol)
    with pytest.raises(InvalidArgument, match="backend must be one of"):
        block_ops.skinny_linear(x, w2, backend="cuda")
    with pytest.raises(InvalidArgument, match=r"weight must be \[N > 0, 40\]"):
        block_ops.skinny_linear(x, w2, backend="torch")  # checked at entry on the torch path too


def test_fp16_is_refused_by_the_fused_norm_kernels_because_it_overflows():
    """h x norm_weight is rounded to the operand dtype before the 1/rms scale: in fp16 it passes 65504 where the
    reference's normalised activations do not. Shown on the launcher, refused by the entry points, never chosen."""
    norm_w13 = pytest.importorskip("llamagen_core2.kernels.norm_w13_swiglu")
    g = torch.Generator().manual_seed(0)
    d, F_ = 32, 16
    x = (torch.randn(2, 1, d, generator=g) * 300).half()  # |h| ~ 300-1000, fine in fp16
    norm_weight = torch.full((d,), 300.0).half()           # h x w ~ 1e5 > 65504
    w13 = (torch.randn(2 * F_, d, generator=g) * d ** -0.5 / 300).half()
    reference, _ = block_ops.norm_w13_swiglu_reference(x, None, norm_weight, 1e-5, w13)
    assert torch.isfinite(reference).all()
    with warnings.catch_warnings():  # numpy's overflow warnings, under the interpreter
        warnings.simplefilter("ignore")
        kernel, _ = norm_w13.norm_w13_swiglu_triton(x, None, norm_weight, 1e-5, w13)
    assert not torch.isfinite(kernel).all()
    fused_fp32, _ = norm_w13.norm_w13_swiglu_triton(x.float(), None, norm_weight.float(), 1e-5, w13.float())
    torch.testing.assert_close(fused_fp32, reference.float(), atol=2e-3, rtol=2e-3)  # fp32: no overflow

    with pytest.raises(InvalidArgument, match="fp32 or bf16 weights, got torch.float16.*65504"):
        block_ops.norm_w13_swiglu(x, None, norm_weight, 1e-5, w13, backend="triton")
    rope, cache = torch.zeros(4, 2, 2), torch.zeros(2, 2, 4, 4, dtype=torch.float16)
    with pytest.raises(InvalidArgument, match="got torch.float16"):
        block_ops.norm_qkv_rope(x, None, norm_weight, 1e-5, torch.zeros(24, d, dtype=torch.float16), rope,
                                torch.tensor([1]), cache, cache, 0, backend="triton")
    # the guard never offers them for fp16 (not even when forced), while the skinny GEMM stays eligible
    asked = []
    for env in ("auto", "triton"):
        for fused_norm in (True, False):
            with pytest.MonkeyPatch.context() as m:
                m.setenv(dispatch.ENV_VAR, env)
                chosen = dispatch.choose_decode_op("cpu", "op", (1,), torch.float16,
                                                   lambda: asked.append(fused_norm) or [
                                                       Candidate("unfused", "torch", lambda: 0),
                                                       Candidate("fused", "triton", lambda: 0)],
                                                   fused_norm=fused_norm, chooser=TimedChoice(lambda r, d: 1.0))
            assert chosen == ("fused" if env == "triton" and not fused_norm else "unfused")
    assert asked == [False, False]


# ---------------------------------------------------------------------- the guard's decisions

class ShapeTimer:
    """Fake seconds per call by (op, GEMM rows, candidate); candidates stand in via `fake_candidates`."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, run, device):
        op, rows, name = run()
        self.calls.append((op, rows, name))
        return self.seconds(op, rows, name)


@pytest.fixture
def fake_candidates(monkeypatch):
    def candidates(layers, rope, shape, op, device, workspace):
        return [Candidate(name, backend, (lambda name=name: (op, shape.gemm_rows, name)))
                for name, backend in (("unfused", "torch"), ("fused", "triton"))]

    monkeypatch.setattr(decode_ops, "candidates", candidates)


def test_fused_ops_are_chosen_per_op_and_shape_where_they_measured_faster(fake_candidates, caplog):
    """Fused faster everywhere at 2 rows; at 6 rows the skinny GEMMs (wo, w2) lose to cuBLAS and are not used;
    each (op, shape) is timed once (wo and w2 are both `decode.linear`, with their own (rows, K, N) keys), and a
    second engine's asks are answered from the cache."""
    model = tiny_gpt()
    timer = ShapeTimer(lambda op, rows, name: (1e-6 if name == "fused" else 2e-6) if rows == 2 or op not in
                       ("wo", "w2") else (3e-6 if name == "fused" else 2e-6))
    chooser = TimedChoice(timer)
    workspace = gemm.SplitKWorkspace()
    with caplog.at_level(logging.INFO, logger="llamagen_core2.kernels"):
        two = decode_ops.choose(model.layers, model.rope, LayerShape.of(model.layers, 2, 1), CUDA, workspace,
                                chooser)
        six = decode_ops.choose(model.layers, model.rope, LayerShape.of(model.layers, 3, 2), CUDA, workspace,
                                chooser)
    assert two.key == ALL and two.workspace is workspace
    assert six.key == (True, False, True, False)
    assert len(timer.calls) == 16 and len(set(timer.calls)) == 16  # 4 ops x 2 shapes x 2 candidates, once each
    assert decode_ops.choose(model.layers, model.rope, LayerShape.of(model.layers, 2, 1), CUDA, workspace,
                             chooser) == two and len(timer.calls) == 16  # cached
    lines = [r.getMessage() for r in caplog.records if "timed choice: decode.linear" in r.getMessage()]
    assert len(lines) == 4 and any("(6, 64, 64, 'float32'): unfused" in line for line in lines), lines
    # slower everywhere: nothing fused, and no workspace is handed to the step
    slow = TimedChoice(ShapeTimer(lambda op, rows, name: 2e-6 if name == "fused" else 1e-6))
    none = decode_ops.choose(model.layers, model.rope, LayerShape.of(model.layers, 2, 1), CUDA, workspace, slow)
    assert none.key == (False,) * 4 and none.workspace is None


def test_cpu_never_times_and_the_env_forces_either_path(fake_candidates, monkeypatch):
    model = tiny_gpt()
    shape = LayerShape.of(model.layers, 2, 1)
    timer = ShapeTimer(lambda op, rows, name: 1e-6 if name == "fused" else 2e-6)
    chooser = TimedChoice(timer)
    assert decode_ops.choose(model.layers, model.rope, shape, "cpu", None, chooser).key == (False,) * 4
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert decode_ops.choose(model.layers, model.rope, shape, CUDA, None, chooser).key == ALL
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert decode_ops.choose(model.layers, model.rope, shape, CUDA, None, chooser).key == (False,) * 4
    assert timer.calls == []


def test_the_real_candidates_compute_the_same_thing():
    """decode_ops.candidates: the unfused group and the fused kernel on the same representative inputs, for the base
    model's and the weak model's trunk shapes (interpreted on CPU)."""
    model = tiny_gpt()
    for trunk, rows, width in ((model, 3, 1), (model, 2, 3), (weak_for(model), 2, 1)):
        shape = LayerShape.of(trunk.layers, rows, width)
        workspace = gemm.SplitKWorkspace()
        for op in decode_ops.OPS:
            unfused, fused = decode_ops.candidates(trunk.layers, trunk.rope, shape, op, "cpu", workspace)
            assert (unfused.name, unfused.backend, fused.name, fused.backend) == ("unfused", "torch", "fused",
                                                                                 "triton")
            torch.testing.assert_close(fused.run(), unfused.run(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- the engine

class RecordingGraphs:
    """Stands in for StepGraphs on CPU: records keys and clears, runs each chunk eagerly."""
    events: list = []

    def __init__(self, device):
        pass

    def clear(self):
        self.events.append("clear")

    def run(self, key, fn, save_state, restore_state):
        self.events.append(("graph", key))
        fn()


@pytest.fixture
def recording_engine(monkeypatch):
    from llamagen_core2.decode import engine as engine_module

    RecordingGraphs.events = []
    monkeypatch.setattr(engine_module, "StepGraphs", RecordingGraphs)
    monkeypatch.setattr(Engine, "use_graphs", property(lambda self: True))
    monkeypatch.setattr(dispatch, "choose_sampler_select", lambda *a, **k: "kernel")
    return RecordingGraphs.events


def test_engine_decides_per_trunk_shape_before_capture_and_the_flags_join_the_graph_key(recording_engine,
                                                                                         monkeypatch):
    """A mixed plan (stand-in decisions): the base model's 3 cond rows fused, its 6 CFG rows only the GEMMs, the
    weak model's trunk fused but for W2. Every decision comes before the first graph, each graph key carries the
    flags of its pass, and the tokens are the eager loop's."""
    events = recording_engine
    plan = {(64, 3): (True, True, True, True), (64, 6): (False, True, False, True), (32, 3): (True, True, True, False)}

    def choose(layers, rope, shape, device, workspace, chooser=None):
        events.append(("choose", shape.dim, shape.gemm_rows))
        return DecodeOps(*plan[(shape.dim, shape.gemm_rows)], workspace=workspace)

    monkeypatch.setattr(decode_ops, "choose", choose)
    model = tiny_gpt()
    weak = weak_for(model)
    cond = torch.tensor([1, 2, 3])
    kw = dict(schedule=["fast"] * 5 + ["slow"] * 11, weak_model=weak, w2s_scale=1.5, cfg_scale=4.0, top_k=0, seed=2)
    engine = Engine(model, backend="triton", steps_per_graph=4)
    tokens = generate(model, cond, engine=engine, **kw)
    assert torch.equal(tokens, generate(model, cond, engine="eager", **kw))
    chosen = [e for e in events if e[0] == "choose"]
    assert sorted(chosen) == [("choose", 32, 3), ("choose", 64, 3), ("choose", 64, 6)]
    first_graph = next(i for i, e in enumerate(events) if e[0] == "graph")
    assert all(events.index(e) < first_graph for e in chosen)
    keys = [e[1] for e in events if e[0] == "graph"]
    fast, slow = (plan[(64, 3)], plan[(32, 3)]), (plan[(64, 6)], plan[(32, 3)])  # (base flags, weak flags)
    assert keys and all((fast in key) != (slow in key) for key in keys)
    assert all(fast in key for key in keys if key[0] == "fast") and all(slow in key for key in keys if key[0] == "slow")


def test_the_workspace_is_sized_before_capture_and_a_moved_one_drops_the_graphs(recording_engine, monkeypatch):
    """Every GEMM split 2 ways (the interpreter's own configs never split), fused everywhere: the workspace the
    engine sizes from the shapes before any graph is never grown by a launch, its counters end at zero, the tokens
    are the eager loop's. A larger request grows it and the graphs reading the old one are dropped."""
    events = recording_engine
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    split = gemm.GemmConfig(16, 64, 32, 2, 4, 1)  # K = 64 or 192: 2 or 6 K blocks, every GEMM split in 2
    monkeypatch.setattr(gemm, "gemm_config", lambda *a, **k: split)
    model = tiny_gpt("t2i")
    feats, mask = captions(model, 3, [3, 6, 1])
    kw = dict(schedule=["cond"] * 3 + ["cfg"] * 5, num_tokens=8, cfg_scale=4.0, top_k=0, seed=2)
    engine = Engine(model, backend="triton", steps_per_graph=4)
    prepare = engine.prepare_decode_ops
    sized = []

    def prepare_and_record(request, passes):
        prepare(request, passes)
        sized.append((engine.workspace.partials.data_ptr(), engine.workspace.partials.numel()))

    monkeypatch.setattr(engine, "prepare_decode_ops", prepare_and_record)
    tokens = generate(model, feats, cond_mask=mask, engine=engine, **kw)
    assert torch.equal(tokens, generate(model, feats, cond_mask=mask, engine="eager", **kw))
    assert {ops.key for ops in engine.request.decode_ops.values()} == {ALL}
    assert (engine.workspace.partials.data_ptr(), engine.workspace.partials.numel()) == sized[-1]
    assert not engine.workspace.counters.any()
    events.clear()
    generate(model, feats[:2], cond_mask=mask[:2], engine=engine, **kw)  # fewer rows: nothing moves
    assert "clear" not in events and engine.workspace.partials.data_ptr() == sized[0][0]
    events.clear()  # Jacobi windows of 4 positions: 4x the GEMM rows, same caches
    window = generate(model, feats, cond_mask=mask, engine=engine, decoding="jacobi", jacobi_window=4, **kw)
    assert torch.equal(window, tokens)
    assert sized[-1][1] > sized[0][1] and engine.workspace.partials.numel() == sized[-1][1]
    assert events.count("clear") == 1 and events.index("clear") < next(
        i for i, e in enumerate(events) if e[0] == "graph")


def test_decode_ops_outside_a_triton_decode_step_are_refused():
    model = tiny_gpt()
    cache = model.new_cache(2)
    x = model.embed_tokens(torch.tensor([[1], [2]]))
    ops = DecodeOps(True, True, True, True, workspace=gemm.SplitKWorkspace())
    with pytest.raises(InvalidArgument, match="decode_ops .* serve a decode step .* backend='torch'"):
        model.forward_hidden(x, cache, position=torch.tensor([1]), max_end=4, backend="torch", decode_ops=ops)
    with pytest.raises(InvalidArgument, match="position=None"):
        model.forward_hidden(x, cache, start=1, backend="triton", decode_ops=ops)
