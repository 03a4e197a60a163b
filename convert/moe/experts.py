"""How a dense SwiGLU FFN becomes routed experts: the shared math of `moe` and `fine-moe`.

A SwiGLU FFN is a sum over its d_ff neurons,  FFN(x) = sum_n down[:, n] * silu(gate[n] . x) * (up[n] . x),
so splitting the neurons into G partitions P_1..P_G gives FFN(x) = sum_g FFN_g(x) exactly.
We make E copies of the FFN and split each into G partitions: E*G experts, expert (c, g) = copy c,
partition g, at index c*G + g. Each expert's down projection is multiplied by G.

The native targets route as  y = sum_{i in topK(p)} (p_i / sum_{j in topK} p_j) * expert_i(x),
with p = softmax(router . x). Router rows are "virtual groups" (as in NVIDIA's Megatron-Core
upcycling): all G experts of copy c share one random row r_c, so they tie and are selected
together. If K = m*G, the top-K set is m whole copies, each of whose G experts gets the same weight
w_c, with G * sum_c w_c = 1. Then
    y = sum_c w_c * sum_g G * FFN_g(x) = G * sum_c w_c * FFN(x) = FFN(x),
so the converted model reproduces the teacher. Conditions: G divides K, the virtual-group router,
and no re-initialisation (Drop-Upcycling changes the weights on purpose). With K < G only part of
each token's neurons run, so the model cannot be exact; the experts are then scaled by K instead,
so that the selected partitions add up as in the dense FFN (see `ExpertLayout.expert_scale`). (Megatron instead spreads the factor over all three
projections; silu is not homogeneous, so that is not exact for SwiGLU. Scaling only `down` is.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sparsify.convert.base import Exactness
from sparsify.convert.moe.options import ROUTER_INITS, SPLITS
from sparsify.errors import SparsifyError


@dataclass(frozen=True)
class ExpertLayout:
    copies: int  # E
    granularity: int  # G
    top_k: int  # K
    split: str = "contiguous"
    reinit_ratio: float = 0.0
    router_init: str = "virtual-group"
    router_std: float = 0.02
    seed: int = 0

    @property
    def experts(self) -> int:
        return self.copies * self.granularity

    @property
    def expert_scale(self) -> int:
        """Factor on each expert's down projection. G makes whole copies exact (K = m*G). With
        K < G a token runs only K partitions; scaling them by K makes the layer output the plain
        sum of the selected partitions, whereas G would amplify them by G/K. On SmolLM2-135M,
        G=8 K=4, held-out perplexity at conversion was 28k with K against 419k with G."""
        return self.granularity if self.top_k >= self.granularity else self.top_k

    def validate(self, d_ff: int) -> None:
        if self.copies < 1 or self.granularity < 1:
            raise SparsifyError("--experts and --granularity must be at least 1")
        if d_ff % self.granularity:
            divisors = [g for g in range(2, min(d_ff, 64) + 1) if d_ff % g == 0]
            raise SparsifyError(
                f"granularity {self.granularity} does not divide the FFN size d_ff={d_ff}; "
                f"choose one of {divisors}"
            )
        if not 1 <= self.top_k <= self.experts:
            raise SparsifyError(
                f"top-k {self.top_k} must be between 1 and the number of experts, {self.experts} "
                f"({self.copies} copies x granularity {self.granularity})"
            )
        if not 0.0 <= self.reinit_ratio < 1.0:
            raise SparsifyError(f"--reinit-ratio must be in [0, 1), got {self.reinit_ratio}")
        if self.split not in SPLITS:
            raise SparsifyError(f"--split must be one of {', '.join(SPLITS)}, got '{self.split}'")
        if self.router_init not in ROUTER_INITS:
            raise SparsifyError(f"--router-init must be one of {', '.join(ROUTER_INITS)}, got '{self.router_init}'")

    def exactness(self) -> Exactness:
        k, g = self.top_k, self.granularity
        if self.reinit_ratio > 0:
            return Exactness(False, f"Drop-Upcycling re-initialised {self.reinit_ratio:.0%} of the neurons of copies 1..{self.copies - 1}")
        if k % g:
            if k < g:
                return Exactness(False, f"top-k {k} < granularity {g}: each token runs {k}/{g} of its FFN neurons")
            return Exactness(False, f"top-k {k} is not a multiple of granularity {g}: partitions are covered unevenly")
        if g > 1 and self.router_init != "virtual-group":
            return Exactness(False, "a random router does not select whole copies; use --router-init virtual-group")
        return Exactness(True, f"top-k {k} selects {k // g} whole cop{'y' if k == g else 'ies'} of the FFN")


def _generator(seed: int, *keys: int) -> torch.Generator:
    value = seed
    for key in keys:
        value = (value * 1_000_003 + key) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


_ROUTER, _SPLIT, _REINIT = 1, 2, 3


def neuron_order(layout: ExpertLayout, layer: int, d_ff: int) -> torch.Tensor | None:
    """The neuron permutation applied before partitioning (None for contiguous)."""
    if layout.split == "contiguous":
        return None
    return torch.randperm(d_ff, generator=_generator(layout.seed, _SPLIT, layer))


def _reinit(ffn: dict[str, torch.Tensor], layout: ExpertLayout, layer: int, copy: int) -> dict[str, torch.Tensor]:
    """Drop-Upcycling: redraw a seeded subset of neurons from N(mean, std) of each matrix.

    Applied to copies 1..E-1 (see `LayerExperts._copy_weights`)."""
    gen = _generator(layout.seed, _REINIT, layer, copy)
    d_ff = ffn["gate"].shape[0]
    chosen = torch.randperm(d_ff, generator=gen)[: round(layout.reinit_ratio * d_ff)]
    out = {}
    for role, weight in ffn.items():
        w = weight.float().clone()
        neurons = w[:, chosen] if role == "down" else w[chosen]
        fresh = torch.randn(neurons.shape, generator=gen) * w.std() + w.mean()
        if role == "down":
            w[:, chosen] = fresh
        else:
            w[chosen] = fresh
        out[role] = w.to(weight.dtype)
    return out


class LayerExperts:
    """Produces one layer's expert tensors from its dense FFN, lazily and one copy at a time."""

    def __init__(self, layout: ExpertLayout, layer: int, load_ffn: Callable[[], dict[str, torch.Tensor]], dtype: torch.dtype):
        self.layout, self.layer, self.dtype = layout, layer, dtype
        self._load_ffn = load_ffn
        self._ffn: dict[str, torch.Tensor] | None = None
        self._copy: tuple[int, dict[str, torch.Tensor]] | None = None

    def _dense(self) -> dict[str, torch.Tensor]:
        if self._ffn is None:
            ffn = self._load_ffn()
            order = neuron_order(self.layout, self.layer, ffn["gate"].shape[0])
            if order is not None:
                ffn = {"gate": ffn["gate"][order], "up": ffn["up"][order], "down": ffn["down"][:, order]}
            self._ffn = ffn
        return self._ffn

    def _copy_weights(self, copy: int) -> dict[str, torch.Tensor]:
        # Copy 0 is never re-initialised: it keeps the dense FFN inside the MoE weights, so the
        # teacher can be computed from the student's own frozen weights during router training.
        if self.layout.reinit_ratio == 0 or copy == 0:
            return self._dense()
        if self._copy is None or self._copy[0] != copy:
            self._copy = (copy, _reinit(self._dense(), self.layout, self.layer, copy))
        return self._copy[1]

    def router(self, hidden: int) -> torch.Tensor:
        """The router's initial weight, (experts, hidden)."""
        layout = self.layout
        gen = _generator(layout.seed, _ROUTER, self.layer)
        if layout.router_init == "gate-mean":
            # Logit of partition g = mean gate pre-activation of its neurons: a token goes to the
            # partitions whose neurons it excites most. Rescaled to router_std; copies 1.. get a
            # little noise so that they do not tie with copy 0.
            gate = self._dense()["gate"].float()
            rows = gate.reshape(layout.granularity, -1, hidden).mean(dim=1)
            rows = (rows / rows.std() * layout.router_std).repeat(layout.copies, 1)
            noise = torch.randn(rows.shape, generator=gen) * layout.router_std * 0.1
            noise[: layout.granularity] = 0
            return (rows + noise).to(self.dtype)
        if layout.router_init == "virtual-group":
            rows = torch.randn(layout.copies, hidden, generator=gen) * layout.router_std
            return rows.repeat_interleave(layout.granularity, dim=0).to(self.dtype)
        return (torch.randn(layout.experts, hidden, generator=gen) * layout.router_std).to(self.dtype)

    def expert(self, expert: int, role: str) -> torch.Tensor:
        copy, part = divmod(expert, self.layout.granularity)
        weight = self._copy_weights(copy)[role]
        size = weight.shape[0 if role != "down" else 1] // self.layout.granularity
        rows = slice(part * size, (part + 1) * size)
        if role == "down":
            piece = weight[:, rows]
            if self.layout.expert_scale > 1:
                # One rounding either way: torch multiplies low-precision floats in fp32.
                return (piece.to(self.dtype) * self.layout.expert_scale).contiguous()
            return piece.to(self.dtype).contiguous()
        return weight[rows].to(self.dtype).contiguous()

    def release(self) -> None:
        self._ffn = None
        self._copy = None
