"""Guided sampling: mix + temperature + top-k + top-p + sampling, LlamaGen's sampler with CoRe^2 modes.

`guided_sample` is the one entry of the AR sampler: the torch reference below (the CPU path and the test oracle),
or the fused Triton kernel `llamagen_core2.kernels.fused_guided_sample` when `llamagen_core2.kernels.dispatch`
selects it (docs/design.md#sampler). Mixing is `mixing.mix_guidance`; the race noise is Philox (`philox.py`).
Knobs are Python numbers or per-row tensors of shape [B].
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import InvalidArgument, check_sampling_args
from .config import Scale
from .mixing import check_mix_args, mix
from .philox import check_offset, check_seeds, draw_keys, race_uniforms


def _row_values(x, name: str, batch: int, device, dtype) -> torch.Tensor:
    t = torch.as_tensor(x, device=device, dtype=dtype)
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise InvalidArgument(f"{name} must be a number or a tensor of shape [{batch}], got {list(t.shape)}")
    return t


def filter_flags(temperature, top_k, top_p, vocab: int) -> tuple[bool, bool]:
    """(top_k_on, top_p_on): whether any sampled row (temperature != 0) uses top-k (0 < k < vocab) / top-p
    (p < 1). Knobs are numbers or [B] tensors; a tensor on a GPU is read once (a host sync): call it once per
    request, not per step (the engine does, and passes the answer to every step as `filters`)."""
    def host(x):
        return torch.as_tensor(x).detach().reshape(-1).cpu()

    t, k, p = host(temperature), host(top_k), host(top_p)
    n = max(t.numel(), k.numel(), p.numel())
    sampled = (t != 0).expand(n)
    return bool((sampled & (k > 0).expand(n) & (k < vocab).expand(n)).any()), bool((sampled & (p < 1).expand(n)).any())


def filter_logits(logits: torch.Tensor, *, top_k=0, top_p=1.0) -> torch.Tensor:
    """LlamaGen's top-k then top-p filtering on [B, V] logits; removed entries become -inf.

    top-k keeps every logit >= the k-th largest (ties at the k-th value survive); top-p keeps the
    smallest prefix of the descending order whose mass reaches p, including the token that crosses.
    """
    batch, vocab = logits.shape
    out = logits.clone()
    ks = _row_values(top_k, "top_k", batch, logits.device, torch.long).clamp(max=vocab)
    if bool((ks > 0).any()):
        kmax = int(ks.max())
        topv = torch.topk(out, kmax, dim=-1).values  # [B, kmax] descending
        kth = topv.gather(1, (ks.clamp(min=1) - 1).unsqueeze(1))  # [B, 1]
        kth = torch.where(ks.unsqueeze(1) > 0, kth, torch.full_like(kth, float("-inf")))
        out = out.masked_fill(out < kth, float("-inf"))
    ps = _row_values(top_p, "top_p", batch, logits.device, torch.float32)
    if bool((ps < 1.0).any()):
        sorted_logits, sorted_idx = torch.sort(out, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cum > ps.unsqueeze(1)
        remove[:, 1:] = remove[:, :-1].clone()  # shift right: keep the token that crosses p
        remove[:, 0] = False
        remove &= (ps < 1.0).unsqueeze(1)
        out = out.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return out


def sample_logits(
    logits: torch.Tensor,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    generator: Optional[torch.Generator] = None,
    seeds=None,
    offset=0,
) -> torch.Tensor:
    """Sample one token per row from logits [B, V] -> LongTensor [B].

    temperature 0 means greedy (first index on ties). Sampling is a Gumbel race over the kept
    tokens: argmax_j x_j - log(-log U_j), x = logits / temperature in fp32, which draws exactly
    from softmax(x) over the kept set without a host synchronisation. U is Philox noise
    (`llamagen_core2.guidance.philox`): with `seeds` (an int, or an int64 tensor [1] or [B]) and `offset`
    (an int, or an int64 tensor [1], or [B]: one counter base per row) the uniforms -- and so the tokens --
    are those of the fused Triton kernel for the same arguments; otherwise one key per row is drawn from
    `generator` (the default generator of the logits' device when None) and `offset` (0 by default) is the
    counter base. Checks its arguments, then `race`.
    """
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise InvalidArgument(f"logits must be [B, V] with B > 0, got shape {list(logits.shape)}")
    check_sampling_args(temperature, top_k, top_p)
    seeds, offset = race_key(generator, seeds, offset, logits.shape[0], logits.shape[1], logits.device)
    return race(logits, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds, offset=offset)


def race(logits: torch.Tensor, *, temperature, top_k, top_p, seeds: torch.Tensor, offset) -> torch.Tensor:
    """`sample_logits` on checked arguments (`seeds`, `offset` as `race_key` returns them): nothing is checked."""
    batch, vocab = logits.shape
    logits = logits.float()
    temps = _row_values(temperature, "temperature", batch, logits.device, torch.float32)
    greedy_rows = temps == 0
    scaled = logits / torch.where(greedy_rows, torch.ones_like(temps), temps).unsqueeze(1)
    filtered = filter_logits(scaled, top_k=top_k, top_p=top_p)
    uniform = race_uniforms(seeds, offset, batch, vocab)
    # the kernel's race: kept scores are clamped to >= -FLT_MAX so that U = 0 never ties a removed token
    score = (filtered - torch.log(-torch.log(uniform))).clamp(min=-torch.finfo(torch.float32).max)
    score = torch.where(filtered > float("-inf"), score, torch.full_like(score, float("-inf")))
    sampled = score.argmax(dim=-1)
    return torch.where(greedy_rows, logits.argmax(dim=-1), sampled)


def race_key(generator: Optional[torch.Generator], seeds, offset, batch: int, vocab: int, device):
    """The (keys, offset) a draw uses, checked, for either backend: `seeds` and `offset` as given,
    or -- without seeds -- one fresh key per row from `generator` (drawn on its own device, no host
    sync) and `offset`."""
    if seeds is not None and generator is not None:
        raise InvalidArgument("pass either seeds (with offset) or generator, not both")
    if seeds is None:
        seeds = draw_keys(generator, batch, device)
    seeds = check_seeds(seeds, batch, vocab, device)
    return seeds, check_offset(offset, batch, vocab, seeds.numel())


def guided_sample(
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor] = None,
    weak: Optional[torch.Tensor] = None,
    *,
    mode: str = "cfg",
    cfg_scale: Scale = 1.0,
    w2s_scale: Scale = 1.0,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    generator: Optional[torch.Generator] = None,
    seeds=None,
    offset=0,
    return_mixed: bool = False,
    check_values: bool = True,
    backend: Optional[str] = None,
    filters: Optional[tuple] = None,
    select: str = "kernel",
    top_k_max: Optional[int] = None,
):
    """Mix then sample: [B, V] logits in, LongTensor [B] out (and the fp32 mixed logits if asked).

    The backend is chosen in one place, `llamagen_core2.kernels.dispatch.select_backend`
    (LLAMAGEN_CORE2_KERNELS=auto|triton|torch), unless the caller passes the `backend` it already chose
    (the decode engine decides once per request for the block ops and the sampler). RNG contract (the same for
    both backends, so they give the same tokens for the same arguments up to the ulps of `log`,
    docs/sampling.md): with `seeds` the race uses Philox keys `seeds` (an int or int64 tensor [1]: one key,
    counters offset + row * V + column; an int64 tensor [B]: one key per row, counters offset + column) and
    the counter base `offset` (an int or a device-resident int64 tensor [1]; or [B], one base per row:
    row b then uses counters offset[b] + column with either kind of keys, exactly what a one-row call
    with offset[b] draws); a caller reusing its keys advances offset by V per draw with per-row keys or
    offsets (B * V with one key and one offset). Without seeds, one key per row is drawn from `generator`
    with torch.randint on the generator's device (no host sync) and the offset is `offset` (0 by default).

    Arguments are validated once: here with `check_values=True` (every argument, the values of per-row tensor
    knobs included -- a host sync), or by the caller at its entry with `check_values=False` (generate() and the
    decode loops validate a request once; nothing is checked here then, `seeds` and `offset` must be in
    `race_key`'s form -- int64 keys [1] or [B] on the logits' device -- and no generator is used).
    `filters` (the host's (top_k_on, top_p_on) promise, `filter_flags`), `select` ("kernel" | "torch") and
    `top_k_max` tune the Triton path only (`kernels.fused_guided_sample`); the torch reference needs no promise.
    """
    from ..kernels.dispatch import select_backend

    knobs = dict(cfg_scale=cfg_scale, w2s_scale=w2s_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    if backend not in (None, "torch", "triton"):
        raise InvalidArgument(f"backend must be None (dispatch decides), 'torch' or 'triton', got {backend!r}")
    if check_values:
        seeds, offset = _check_guided_args(cond, uncond, weak, mode, knobs, generator, seeds, offset)
    if (backend or select_backend(cond.device)) == "triton":
        from ..kernels.fused_guided_sample import check_launch_args, launch

        if check_values:
            check_launch_args(cond, uncond, weak, select=select, filters=filters)
        return launch(cond, uncond, weak, mode=mode, **knobs, seeds=seeds, offset=offset, return_mixed=return_mixed,
                      filters=filters, read_filters=check_values, select=select, top_k_max=top_k_max)

    mixed = mix(cond.float(), None if uncond is None else uncond.float(), None if weak is None else weak.float(),
                cfg_scale=cfg_scale, w2s_scale=w2s_scale, mode=mode)
    tokens = race(mixed, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds, offset=offset)
    return (tokens, mixed) if return_mixed else tokens


def _check_guided_args(cond, uncond, weak, mode: str, knobs: dict, generator, seeds, offset):
    """Every argument of guided_sample but the Triton path's own (fused_guided_sample.check_launch_args) ->
    the checked (seeds, offset)."""
    if not isinstance(cond, torch.Tensor) or cond.dim() != 2 or cond.shape[0] == 0:
        shape = list(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise InvalidArgument(f"cond must be [B, V] logits with B > 0, got {shape}")
    check_mix_args(cond, uncond, weak, cfg_scale=knobs["cfg_scale"], w2s_scale=knobs["w2s_scale"], mode=mode)
    check_sampling_args(knobs["temperature"], knobs["top_k"], knobs["top_p"])
    batch = cond.shape[0]
    for name in ("temperature", "top_k", "top_p"):
        value = knobs[name]
        if isinstance(value, torch.Tensor) and value.dim() != 0 and tuple(value.shape) != (batch,):
            raise InvalidArgument(f"{name} must be a number or a tensor of shape [{batch}], got {list(value.shape)}")
    return race_key(generator, seeds, offset, batch, cond.shape[1], cond.device)
