"""The prompt summary a CoRe^2 noise model consumes, built the way the official pipelines build it.

Official recipe (xie-lab-ml/CoRe, commit a8f984f7; the file and line of each step are in
docs/diffusion.md, "Prompt summary"). For ONE prompt:

    cond, uncond   its prompt-token encodings [n, E] and pooled vectors [p], from an encode_prompt
                   call with the recipe's fixed settings (below), not the generation's own settings
    M       = the two token matrices stacked along tokens, in the pipeline's order     [2n, E]
    pooled  = the two pooled vectors concatenated in the same order                    [2p]
    U, S, Vh = torch.linalg.svd(M.float())      (full matrices, fp32)
    s = U[:r]     the first r ROWS of U                                                [r, 2n]
    v = S[:r],  d = Vh[:r]                                                             [r], [r, E]

The noise model then forms s^T diag(v) d (refine_model.py), so the rows of U are what the
released weights were trained with. Per pipeline kind:

    sd3    [cond ; uncond]; its own encode_prompt(prompt, negative_prompt="") at the default
           max_sequence_length 256 (2 x (77 + 256) = 666 tokens), whatever the generation uses
    sdxl   [uncond ; cond]; encode_prompt(prompt) with no negative prompt, which the SDXL pipeline
           turns into zero uncond embeddings (force_zeros_for_empty_prompt) -- what the official
           sampler feeds (it never passes a negative prompt); 2 x 77 = 154 tokens
    flux   no official noise model; ours follows the sd3 recipe: [cond ; uncond], negative "",
           the FLUX default max_sequence_length 512

So the summary is a property of the prompt alone: the user's negative prompt and
max_sequence_length change the pipeline's guidance, never the noise model's prompt features.
It is computed once per prompt per generation (prompt_summary), before the pipeline runs, with one
encode_prompt call per prompt as the official code makes (its pipelines take one prompt at a time).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch

from ..errors import InvalidArgument, check_int
from .layouts import pipeline_kind


class PromptSummary(NamedTuple):
    """Noise-model prompt inputs, one row per image: s [B,r,T], v [B,r], d [B,r,E], pooled [B,P] (fp32)."""
    s: torch.Tensor
    v: torch.Tensor
    d: torch.Tensor
    pooled: torch.Tensor


@dataclass(frozen=True)
class SummaryRecipe:
    cond_first: bool                       # token / pooled order of the two halves
    negative_prompt: Optional[str]         # what the uncond half encodes (None: the pipeline's default)
    max_sequence_length: Optional[int]     # T5 tokens of the summary's encoding (None: no T5 setting)

    def describe(self) -> str:
        order = "[cond ; uncond]" if self.cond_first else "[uncond ; cond]"
        return (f"{order}, negative {self.negative_prompt!r}, T5 tokens {self.max_sequence_length}, "
                "first r rows of U")


RECIPES = {
    "sd3": SummaryRecipe(cond_first=True, negative_prompt="", max_sequence_length=256),
    "sdxl": SummaryRecipe(cond_first=False, negative_prompt=None, max_sequence_length=None),
    "flux": SummaryRecipe(cond_first=True, negative_prompt="", max_sequence_length=512),
}


def stack_halves(cond: torch.Tensor, uncond: torch.Tensor, cond_first: bool, dim: int) -> torch.Tensor:
    return torch.cat([cond, uncond] if cond_first else [uncond, cond], dim=dim)


def prompt_features(tokens: torch.Tensor, pooled: torch.Tensor, rank: int) -> PromptSummary:
    """tokens [B, T, E] (halves already stacked), pooled [B, P] -> PromptSummary, the official SVD per row.

    Each row gets its own unbatched fp32 torch.linalg.svd with full matrices, as the official code
    calls it (batched CUDA SVD may take another algorithm). Triplets past min(T, E) -- only in
    tiny test models, never at the released shapes -- are zeros.
    """
    if tokens.dim() != 3 or pooled.dim() != 2 or tokens.shape[0] != pooled.shape[0]:
        raise InvalidArgument(f"tokens must be [B, T, E] and pooled [B, P], got {list(tokens.shape)} and {list(pooled.shape)}")
    rank = check_int("rank", rank, minimum=1)
    B, T, E = tokens.shape
    s = tokens.new_zeros((B, rank, T), dtype=torch.float32)
    v = tokens.new_zeros((B, rank), dtype=torch.float32)
    d = tokens.new_zeros((B, rank, E), dtype=torch.float32)
    for b in range(B):
        U, S, Vh = torch.linalg.svd(tokens[b].float(), full_matrices=True)   # U [T,T], S [min], Vh [E,E]
        k = min(rank, S.shape[0])
        s[b, :min(rank, T)] = U[:rank]
        v[b, :k] = S[:k]
        d[b, :k] = Vh[:k]
    return PromptSummary(s, v, d, pooled.float())


def encode_halves(pipe, prompt: str):
    """The summary's own encoding of one prompt -> (cond [1,n,E], uncond [1,n,E], cond_pooled [1,p], uncond_pooled [1,p])."""
    kind = pipeline_kind(pipe)
    recipe, device = RECIPES[kind], pipe._execution_device
    if kind == "sd3":
        # prompt_2 / prompt_3 default to the prompt; clip_skip, LoRA scale at their defaults
        return pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, device=device,
                                  num_images_per_prompt=1, do_classifier_free_guidance=True,
                                  negative_prompt=recipe.negative_prompt,
                                  max_sequence_length=recipe.max_sequence_length)
    if kind == "sdxl":
        return pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1,
                                  do_classifier_free_guidance=True, negative_prompt=recipe.negative_prompt)
    cond, cond_pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1,
                                              max_sequence_length=recipe.max_sequence_length)
    uncond, uncond_pooled, _ = pipe.encode_prompt(prompt=recipe.negative_prompt, prompt_2=None, device=device,
                                                  num_images_per_prompt=1,
                                                  max_sequence_length=recipe.max_sequence_length)
    return cond, uncond, cond_pooled, uncond_pooled


def prompt_summary(pipe, prompts: Sequence[str], rank: int, *, num_images_per_prompt: int = 1) -> PromptSummary:
    """The noise-model inputs for `prompts` on `pipe`: one row per image (prompt-major, as diffusers orders them)."""
    num_images_per_prompt = check_int("num_images_per_prompt", num_images_per_prompt, minimum=1)
    recipe = RECIPES[pipeline_kind(pipe)]
    tokens, pooled = [], []
    with torch.no_grad():
        # one prompt per encode_prompt call, as the official code runs: a prompt's summary then does not
        # depend on the other prompts of the batch (batched GEMMs need not round alike)
        for prompt in prompts:
            cond, uncond, cond_pooled, uncond_pooled = encode_halves(pipe, prompt)
            tokens.append(stack_halves(cond, uncond, recipe.cond_first, dim=1))
            pooled.append(stack_halves(cond_pooled, uncond_pooled, recipe.cond_first, dim=-1))
        summary = prompt_features(torch.cat(tokens), torch.cat(pooled), rank)
    if num_images_per_prompt == 1:
        return summary
    return PromptSummary(*(t.repeat_interleave(num_images_per_prompt, dim=0) for t in summary))
