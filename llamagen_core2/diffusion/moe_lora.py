"""MoE-LoRA: one LoRA expert per timestep bucket on every Linear, hard-routed by step index.

CoRe^2's diffusion noise models wrap *every* `nn.Linear` of the network in a module holding the
frozen-or-trained base Linear plus E low-rank experts; exactly one expert is active per denoising
step, chosen from the step index alone (no gating network, docs/design.md#diffusion-adapter):

    expert k = clamp(floor(E - (N - i) / N * E), 0, E - 1)      step i of N (0-based)

State-dict layout (matches the released `*_noise_model.pth` files):
    <path>.linear.weight [out, in], <path>.linear.bias [out] (if any),
    <path>.lora.<k>.A [in, rank], <path>.lora.<k>.B [rank, out]
Forward: linear(x) + alpha * (x @ A_k @ B_k).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..errors import InvalidArgument, check_int


def expert_index(step: int, num_steps: int, num_experts: int) -> int:
    """Expert for 0-based step `step` of `num_steps` (formula: docs/design.md#diffusion-adapter)."""
    check_int("num_steps", num_steps, minimum=1)
    check_int("num_experts", num_experts, minimum=1)
    check_int("step", step, minimum=0, maximum=num_steps - 1)
    k = math.floor(num_experts - (num_steps - step) / num_steps * num_experts)
    return min(max(k, 0), num_experts - 1)


class LoRAExpert(nn.Module):
    """One low-rank update x @ A @ B; B starts at zero so a fresh expert is a no-op."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(in_features, rank) / math.sqrt(rank))
        self.B = nn.Parameter(torch.zeros(rank, out_features))


class MoELoRALinear(nn.Module):
    """A Linear plus `num_experts` LoRA experts; `active_expert` (None = off) selects one."""

    def __init__(self, linear: nn.Linear, rank: int, num_experts: int, alpha: float = 1.0):
        super().__init__()
        self.linear = linear
        self.lora = nn.ModuleList(
            LoRAExpert(linear.in_features, linear.out_features, rank) for _ in range(num_experts))
        self.alpha = alpha
        self.active_expert: Optional[int] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.active_expert is None:
            return out
        expert = self.lora[self.active_expert]
        return out + self.alpha * ((x @ expert.A) @ expert.B)


def wrap_linears_with_moe_lora(module: nn.Module, rank: int, num_experts: int, alpha: float = 1.0) -> None:
    """Replace every nn.Linear below `module` (recursively, in place) by a MoELoRALinear."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, MoELoRALinear(child, rank, num_experts, alpha))
        elif not isinstance(child, MoELoRALinear):
            wrap_linears_with_moe_lora(child, rank, num_experts, alpha)


def set_active_expert(module: nn.Module, expert: Optional[int]) -> None:
    for m in module.modules():
        if isinstance(m, MoELoRALinear):
            if expert is not None and not 0 <= expert < len(m.lora):
                raise InvalidArgument(f"expert must be in [0, {len(m.lora) - 1}] or None, got {expert}")
            m.active_expert = expert
