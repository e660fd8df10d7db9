"""A decoder that behaves like the LlamaGen reference, run on the weights of a llamagen_core2 GPT.

It is the "before" of every throughput number (docs/design.md#performance-model): benchmarks run it in the
same process as our engine. What it does, on purpose, the way LlamaGen's `autoregressive/models/generate.py` does:
  * its own KV cache preallocated at the full length S = T + N, and every step attends over all S keys with a
    causal mask (`causal_mask[:, None, input_pos]` in LlamaGen), not just the filled part;
  * CFG whenever any token needs it: always 2B rows ([cond; uncond]); logits split into halves and mixed with
    separate ops `uncond + (cond - uncond) * s`; past `cfg_interval` the uncond half is still computed and
    thrown away; cond mode (cfg_scale <= 1) runs B rows;
  * sampling: logits / max(temperature, 1e-5), top-k via `torch.topk` threshold, top-p via a full sort +
    softmax + cumsum, then softmax + `torch.multinomial` (host-synchronising); temperature 0 = argmax;
  * eager PyTorch ops (the torch references of the block ops), one Python loop iteration per token; with
    `compile=True` the model step is wrapped in `torch.compile(mode="reduce-overhead", fullgraph=True)`, which
    is what LlamaGen's `--compile` flag does to its model (sampling stays eager there too).
CoRe^2 modes (not in LlamaGen) are bolted on the same way: the weak model steps eagerly on the cond hidden
state, fast = weak logits, slow = weak + a (cfg - weak); as in LlamaGen, 2B rows run whenever cfg_scale > 1
(mode "cond" stands for LlamaGen with cfg_scale 1 and runs B rows).

The block math is the model's own (`gpt.forward_hidden`, torch backend): only the cache policy, the row policy
and the sampling differ. With greedy sampling the tokens equal those of `llamagen_core2.decode.generate`
(tests/test_engine.py cross-checks both).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def top_k_top_p_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """LlamaGen-style filtering of [B, V] logits (in place on a copy); removed entries become -inf."""
    logits = logits.clone()
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k)[0][..., -1, None]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(1, sorted_idx, remove)] = float("-inf")
    return logits


def sample_reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                     generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, V] -> [B]: LlamaGen's sample(): temperature, filter, softmax, multinomial (greedy at temperature 0)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits = top_k_top_p_filter(logits, top_k, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


class BaselineDecoder:
    def __init__(self, gpt, compile: bool = False, compile_backend: str = "inductor"):
        """compile=True: the decode step under torch.compile(mode="reduce-overhead", fullgraph=True), as
        LlamaGen's --compile; compile_backend="eager" only checks that the step traces without graph breaks."""
        self.gpt = gpt
        self.cache = None
        self.compiled = compile
        self.step = self._step
        if compile:
            options = dict(mode="reduce-overhead") if compile_backend == "inductor" else {}
            self.step = torch.compile(self._step, backend=compile_backend, fullgraph=True, **options)

    def setup(self, rows: int, prefix_valid: Optional[torch.Tensor] = None) -> None:
        """A cache [rows, H, S, D] per layer at the full length S = T + all image tokens (LlamaGen allocates the
        whole image; the same shapes for any num_tokens, so a compiled step never recompiles for a shorter run);
        t2i padded prefix keys hidden."""
        full = self.gpt.config.max_seq_len
        weight = self.gpt.output.weight
        if self.cache is None or not self.cache.fits(rows, full, weight.dtype, weight.device):
            self.cache = self.gpt.new_cache(rows, full)
            if self.compiled:  # like module buffers (LlamaGen's cache): fixed addresses the CUDA graphs may mutate
                for t in self.cache.k + self.cache.v:
                    torch._dynamo.mark_static_address(t)
        self.cache.set_prefix_mask(prefix_valid)

    def prefill(self, x: torch.Tensor):
        """x [R, T, d] prefix -> (hidden [R, d], fp32 logits [R, V]) of the last position, all S keys read."""
        hidden = self.gpt.forward_hidden(x, self.cache, max_end=self.cache.max_len)[:, -1]
        return hidden, self.gpt.head(hidden)

    def _step(self, tokens: torch.Tensor, input_pos: torch.Tensor):
        """tokens [R] fed at position input_pos [1] -> (hidden [R, d], fp32 logits [R, V]), all S keys read.
        The embedding is inside the step, as in LlamaGen's compiled model."""
        x = self.gpt.embed_tokens(tokens)[:, None]
        hidden = self.gpt.forward_hidden(x, self.cache, position=input_pos, max_end=self.cache.max_len)[:, 0]
        return hidden, self.gpt.head(hidden)

    @torch.inference_mode()
    def generate(self, cond: torch.Tensor, *, num_tokens: Optional[int] = None, mode: str = "cfg",
                 cfg_scale: float = 4.0, cfg_interval: int = -1, temperature: float = 1.0, top_k: int = 2000,
                 top_p: float = 1.0, seed: Optional[int] = None, weak_model=None, w2s_scale: float = 1.0,
                 cond_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens [B, N] for conditions `cond` (class ids [B] or caption features [B, T, C])."""
        gpt = self.gpt
        device = gpt.output.weight.device
        B = gpt.check_condition(cond)
        T = gpt.config.cls_token_num
        N = gpt.config.num_image_tokens if num_tokens is None else int(num_tokens)
        generator = torch.Generator(device=device).manual_seed(0 if seed is None else int(seed))
        with_uncond = mode != "cond" and cfg_scale > 1.0  # LlamaGen: 2B rows whenever cfg_scale > 1
        cond = cond.to(device)
        prefix = gpt.condition_embeddings(cond)
        valid = None if cond_mask is None else cond_mask.to(device)
        if with_uncond:
            prefix = torch.cat([prefix, gpt.condition_embeddings(gpt.null_condition(B, cond))])
            valid = None if valid is None else torch.cat([valid, valid])
        rows = prefix.shape[0]
        self.setup(rows, valid)
        if mode in ("fast", "slow"):
            weak_cache = weak_model.new_cache(B)
            weak_model.prefill(cond, weak_cache, None if cond_mask is None else cond_mask.to(device))
        tokens = torch.zeros(B, N, dtype=torch.long, device=device)
        input_pos = torch.tensor([T], device=device)  # advanced in place, as LlamaGen's decode loop does
        fed = None  # the tokens fed at the next step: the last sampled ones, for both halves
        for i in range(N):
            if i == 0:
                hidden, logits = self.prefill(prefix)  # [rows, d], [rows, V] fp32
            else:
                hidden, logits = self.step(fed, input_pos)
                input_pos += 1
            if with_uncond:
                cond_logits, uncond_logits = torch.split(logits, B, dim=0)
                use_cfg = cfg_interval == -1 or i <= cfg_interval + 1
                cfg = uncond_logits + (cond_logits - uncond_logits) * cfg_scale if use_cfg else cond_logits
            else:
                cond_logits = cfg = logits
            if mode in ("fast", "slow"):
                weak_hidden = weak_model.step_hidden(hidden[:B], weak_cache, start=T + i)
                weak = gpt.head(weak_hidden.to(hidden.dtype)).float()
                mixed = weak if mode == "fast" else weak + (cfg - weak) * w2s_scale
            else:
                mixed = cfg if mode == "cfg" else cond_logits
            nxt = sample_reference(mixed, temperature, top_k, top_p, generator)
            tokens[:, i] = nxt
            fed = nxt.repeat(rows // B)  # the same token feeds both halves
        return tokens
