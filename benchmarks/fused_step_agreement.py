"""How often the fused decode-layer kernels change a sampled token, on CPU (Triton interpreter, fp32, tiny models).

The fused GEMMs sum in another order than torch (tiles, split-K partials) and round the normalised activations
once instead of twice (docs/decode_kernels.md#numerics), so their logits differ from the unfused step's in the
last fp32 bits; a token can only change where two candidates of the sampler's race are that close. This runs the
tests' two engine cases (tests/test_engine.py::test_fused_step_on_cpu_gives_the_eager_tokens: c2i slow -> fast
with a weak model and a catch-up, t2i cond -> cfg with a caption mask) over several seeds, eager torch loop vs
the static engine with LLAMAGEN_CORE2_KERNELS=triton (every fused kernel forced), and reports per case: tokens
compared, tokens that differ, and the largest relative difference of the mixed logits the tokens were sampled
from (max |fused - eager| / max |eager| per step).

    python benchmarks/fused_step_agreement.py --seeds 8          # CPU, one thread
    python benchmarks/fused_step_agreement.py --seeds 1 --num-tokens 4   # a smoke run

Prints a CSV and a final JSON line. Set nothing else: the script sets TRITON_INTERPRET=1 before triton loads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on CPU tensors

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import captions, tiny_gpt  # noqa: E402

from llamagen_core2.core2.weak_model import WeakModel  # noqa: E402
from llamagen_core2.decode.engine import Engine  # noqa: E402
from llamagen_core2.decode.generate import generate  # noqa: E402


def cases(num_tokens: int):
    model = tiny_gpt()
    weak = WeakModel.for_base(model, "W-1", dim=32, n_head=4, fingerprint=False).eval()
    with torch.no_grad():
        for p in weak.parameters():
            p.normal_(0, 0.05)
    yield "c2i slow->fast + weak", model, torch.tensor([1, 2, 3]), dict(
        schedule=(["fast"] * 5 + ["slow"] * 11)[:num_tokens], num_tokens=num_tokens, weak_model=weak, w2s_scale=1.5,
        top_k=20, top_p=0.9)
    t2i = tiny_gpt("t2i")
    feats, mask = captions(t2i, 3, [3, 6, 1])
    yield "t2i cond->cfg + mask", t2i, feats, dict(cond_mask=mask, schedule=(["cond"] * 4 + ["cfg"] * 12)[:num_tokens],
                                                   num_tokens=num_tokens, top_k=0)


def run(model, cond, seed, engine, kw):
    records = []
    tokens = generate(model, cond, seed=seed, cfg_scale=4.0, engine=engine, on_step=records.append, **kw)
    return tokens, torch.stack([r.mixed_logits for r in records], 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--num-tokens", type=int, default=16, help="tokens per image (the tiny models have 16)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = []
    print("case,seeds,tokens,differing_tokens,max_rel_logit_diff")
    for name, model, cond, kw in cases(args.num_tokens):
        compared = differing = 0
        worst = 0.0
        for seed in range(args.seeds):
            os.environ["LLAMAGEN_CORE2_KERNELS"] = "auto"
            eager, mixed_e = run(model, cond, seed, "eager", kw)
            os.environ["LLAMAGEN_CORE2_KERNELS"] = "triton"
            engine = Engine(model, backend="triton")
            fused, mixed_f = run(model, cond, seed, engine, kw)
            assert all(ops.key == (True,) * 4 for ops in engine.request.decode_ops.values())
            compared += eager.numel()
            differing += int((eager != fused).sum())
            # compare where both sampled the same prefix (a differing token changes what follows)
            same = int((eager != fused).any(0).float().argmax()) if (eager != fused).any() else eager.shape[1]
            if same:
                err = ((mixed_e[:, :same] - mixed_f[:, :same]).abs().amax((0, 2))
                       / mixed_e[:, :same].abs().amax((0, 2)))
                worst = max(worst, float(err.max()))
        row = dict(case=name, seeds=args.seeds, tokens=compared, differing_tokens=differing,
                   max_rel_logit_diff=f"{worst:.2e}")
        rows.append(row)
        print(",".join(str(v) for v in row.values()), flush=True)
    print(json.dumps({"rows": rows, "seconds": round(time.perf_counter() - started, 1),
                      "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
