"""Quality of the two weak-model designs on the same collected data: hidden-in/out (shipped) vs logits-in/out.

Both share the trunk (WeakModel: prefix, causal blocks, residual start at the conditional output) and the loss
(KL(cfg || pred) through softmax, temperature 1); they differ only in what goes in and comes out:
  hidden  h_c [d] -> proj_in -> trunk -> h_c (1 + skip) + proj_out(.) [d] -> frozen base head -> logits
  logits  c = head(h_c) [V] -> Linear(V, w) -> trunk -> c (1 + skip) + Linear(w, V)(.) [V]
A random base model has no trained structure, so this compares learnability, not final image quality.

    python benchmarks/compare_weak_inputs.py --dim 256 --vocab 1024 --images 240 --steps 300
Prints one JSON line with held-out KL ratios (weak / cond baseline) for both designs.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import tiny_gpt  # noqa: E402

from llamagen_core2.core2.collect import collect, load_collected  # noqa: E402
from llamagen_core2.core2.reflect import CollectedData, holdout_mask  # noqa: E402
from llamagen_core2.core2.weak_model import WeakModel  # noqa: E402
from llamagen_core2.decode.model import run_blocks  # noqa: E402
from llamagen_core2.guidance.config import GuidanceConfig  # noqa: E402


class LogitsInWeak(WeakModel):
    """Logits-in/logits-out variant: reads and writes V-wide vectors with its own matrices."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        V, w = self.base["vocab_size"], self.config.dim
        self.proj_in = nn.Linear(V, w, bias=False)
        self.proj_out = nn.Linear(w, V, bias=False)
        self.skip_scale = nn.Parameter(torch.zeros(V))
        nn.init.normal_(self.proj_in.weight, std=0.02)
        nn.init.zeros_(self.proj_out.weight)

    def predict_logits(self, gpt, cond, h_c):
        c = gpt.head(h_c)
        T = self.base["cls_token_num"]
        x = torch.cat([self._prefix(cond), self.proj_in(c)], dim=1)
        out = run_blocks(self.layers, self.norm, self.rope, x)[:, T:]  # the trunk of WeakModel.forward
        return self._output(c, out)  # c (1 + skip) + proj_out(out), with this class's V-wide skip and proj_out


def kl(target_logits, pred_logits):
    t = F.log_softmax(target_logits, -1)
    return (t.exp() * (t - F.log_softmax(pred_logits, -1))).sum(-1)


def train(weak, predict, gpt, data, train_idx, held_idx, steps, batch, lr):
    opt = torch.optim.AdamW(weak.parameters(), lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = train_idx[torch.randint(len(train_idx), (batch,), generator=gen)]
        cond, _, h_c, h_cfg = data.batch(idx)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20)
        loss = kl(gpt.head(h_cfg), predict(cond, h_c)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        cond, _, h_c, h_cfg = data.batch(held_idx)
        target = gpt.head(h_cfg)
        return float(kl(target, predict(cond, h_c)).mean()), float(kl(target, gpt.head(h_c)).mean())


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--weak-dim", type=int, default=64)
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gpt = tiny_gpt(dim=args.dim, n_head=4, vocab_size=args.vocab).requires_grad_(False)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        collect(gpt, list(range(10)), tmp, per_condition=args.images // 10, batch_size=24,
                guidance=GuidanceConfig(cfg_scale=4.0, top_k=0), progress=False)
        meta, raw = load_collected(tmp)
    data = CollectedData(meta, raw, 4.0, "cpu")
    held = holdout_mask(data.sample_index, 0.2)
    train_idx, held_idx = torch.nonzero(~held).flatten(), torch.nonzero(held).flatten()
    result = {}
    for name in ("hidden", "logits"):
        torch.manual_seed(0)
        cls = WeakModel if name == "hidden" else LogitsInWeak
        weak = cls.for_base(gpt, "W-2", dim=args.weak_dim, n_head=4, multiple_of=32)
        if name == "hidden":
            def predict(cond, h_c, weak=weak):
                return gpt.head(weak(cond, h_c))
        else:
            def predict(cond, h_c, weak=weak):
                return weak.predict_logits(gpt, cond, h_c)
        weak_kl, base_kl = train(weak, predict, gpt, data, train_idx, held_idx, args.steps, args.batch, args.lr)
        params = sum(x.numel() for x in weak.parameters()) - weak.cond_embedding.weight.numel()
        result[name] = dict(heldout_kl=weak_kl, baseline_kl=base_kl, ratio=weak_kl / base_kl, trunk_params=params)
    print(json.dumps(dict(result, base_dim=args.dim, vocab=args.vocab, weak_dim=args.weak_dim, images=args.images,
                          steps=args.steps, seconds=round(time.time() - started, 1), date=time.strftime("%Y-%m-%d"))))


if __name__ == "__main__":
    main()
