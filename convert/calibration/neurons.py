"""How much each FFN neuron contributes to each calibration token.

A SwiGLU FFN is a sum over neurons, FFN(x) = sum_n down[:, n] * h_n(x) with h_n(x) = silu(g_n.x) * (u_n.x),
so |h_n(x)| * |down[:, n]| is the size of neuron n's term in token x's output: its importance for
that token. Its mean over tokens ranks neurons for pruning and shared experts; its pattern over
tokens (which tokens a neuron matters for) is what co-activation clustering groups neurons by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

TOKENS_PER_CHUNK = 4096


def neuron_outputs(ffn_input: torch.Tensor, ffn: dict[str, torch.Tensor], chunk: int = TOKENS_PER_CHUNK) -> Iterator[torch.Tensor]:
    """h(x) = silu(gate x) * (up x), (tokens, d_ff), chunk by chunk (float32)."""
    for start in range(0, ffn_input.shape[0], chunk):
        x = ffn_input[start : start + chunk]
        yield F.silu(x @ ffn["gate"].T) * (x @ ffn["up"].T)


def importance(ffn_input: torch.Tensor, ffn: dict[str, torch.Tensor], chunk: int = TOKENS_PER_CHUNK) -> Iterator[torch.Tensor]:
    """|h_n(x)| * |down[:, n]|, (tokens, d_ff), chunk by chunk."""
    down_norms = ffn["down"].norm(dim=0)
    for h in neuron_outputs(ffn_input, ffn, chunk):
        yield h.abs() * down_norms


def mean_importance(ffn_input: torch.Tensor, ffn: dict[str, torch.Tensor]) -> torch.Tensor:
    """E_x |h_n(x)| |down_n|, (d_ff,)."""
    total = torch.zeros(ffn["gate"].shape[0], device=ffn_input.device)
    for chunk in importance(ffn_input, ffn):
        total += chunk.sum(dim=0)
    return total / ffn_input.shape[0]


@dataclass
class NeuronStatistics:
    mean_importance: torch.Tensor  # (d_ff,): E_x |h_n(x)| |down_n|
    profiles: torch.Tensor  # (d_ff, sampled tokens): each neuron's share of each sampled token's importance, unit-normalised per neuron

    @classmethod
    def measure(cls, ffn_input: torch.Tensor, ffn: dict[str, torch.Tensor], profile_tokens: int = 16384) -> NeuronStatistics:
        tokens = ffn_input.shape[0]
        # Profiles use evenly spaced tokens: neighbouring tokens of one text are alike, spacing covers more of it.
        sampled = torch.linspace(0, tokens - 1, min(profile_tokens, tokens), device=ffn_input.device).long()
        shares = next(importance(ffn_input[sampled], ffn, chunk=len(sampled)))
        shares = shares / shares.sum(dim=1, keepdim=True).clamp_min(1e-30)  # every token counts the same
        profiles = F.normalize(shares.T.contiguous(), dim=1)
        return cls(mean_importance(ffn_input, ffn), profiles)
