"""The seed rule: one Philox key per image, independent of how images are batched.

Contract:
  * Image `i` of a request with integer seed `s` samples with the 63-bit Philox key `image_key(s, i)`
    (splitmix64 of (s, i)), so image i is the same whether it is generated alone, in a batch of 8 or as the
    i-th image of a 1000-image CLI run split into batches of any size.
  * A `torch.Generator` stands for the seed it yields: one 63-bit draw `b` from it (advancing it), then image j
    of the generator's images gets `image_key(b, j)`. A list of generators gives image i the key
    `image_key(b_i, 0)` of its own generator.
  * No seed and no generator: a fresh random seed (non-reproducible, like torch's default).
The sampler (guidance.guided_sample / the fused kernel) turns key + draw counter into uniforms with Philox, so
the keys are all the state a generation's randomness has: nothing else is drawn per token.
"""
from __future__ import annotations

import numbers
import secrets
from typing import Optional, Sequence, Union

import torch

from ..errors import InvalidArgument

MASK64 = (1 << 64) - 1
MAX_KEY = (1 << 63) - 1  # keys are non-negative int64


def image_key(seed: int, index: int) -> int:
    """splitmix64 of (seed, index), reduced to a non-negative int63."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) & MAX_KEY


def image_keys(seed: int, first_index: int, count: int) -> torch.Tensor:
    """Keys of images first_index .. first_index+count-1 of seed `seed` -> LongTensor [count] (CPU)."""
    seed = check_seed(seed)
    return torch.tensor([image_key(seed, first_index + j) for j in range(count)], dtype=torch.int64)


def check_seed(seed) -> int:
    """An integer (Python or numpy; not bool, not 3.0) in [0, 2**63 - 1], returned as a Python int."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not (0 <= seed <= MAX_KEY):
        raise InvalidArgument(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    return int(seed)


def generator_seed(generator: torch.Generator) -> int:
    """One 63-bit draw from the caller's generator (advances it), on the generator's own device."""
    if not isinstance(generator, torch.Generator):
        raise InvalidArgument(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return int(torch.randint(0, MAX_KEY, (1,), generator=generator, device=generator.device).item())


def row_keys(batch: int, *, seed: Optional[int] = None,
             generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
             first_index: int = 0) -> torch.Tensor:
    """Philox keys [batch] (CPU int64) for rows first_index.. of a request, by the rule in the module doc."""
    if seed is not None and generator is not None:
        raise InvalidArgument("give seed or generator, not both")
    if generator is not None and not isinstance(generator, torch.Generator):
        if not isinstance(generator, Sequence) or not all(isinstance(g, torch.Generator) for g in generator):
            raise InvalidArgument(f"generator must be a torch.Generator or a list of them (one per image), got "
                                  f"{type(generator).__name__}")
        generators = list(generator)
        if len(generators) != batch:
            raise InvalidArgument(f"a list of generators needs one per image ({batch}), got {len(generators)}")
        return torch.tensor([image_key(generator_seed(g), 0) for g in generators], dtype=torch.int64)
    if generator is not None:
        seed = generator_seed(generator)
    elif seed is None:
        seed = secrets.randbelow(MAX_KEY)
    return image_keys(seed, first_index, batch)
