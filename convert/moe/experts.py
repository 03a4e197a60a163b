"""How a dense SwiGLU FFN becomes routed experts: the shared math of `moe` and `fine-moe`.

A SwiGLU FFN is a sum over its d_ff neurons,  FFN(x) = sum_n down[:, n] * silu(gate[n] . x) * (up[n] . x),
so splitting the neurons into G partitions P_1..P_G gives FFN(x) = sum_g FFN_g(x) exactly.
We make E copies of the FFN and split each into G partitions: E*G experts, expert (c, g) = copy c,
partition g, at index c*G + g. Each expert's down projection is multiplied by G.

The native targets route as  y = sum_{i in topK(p)} (p_i / sum_{j in topK} p_j) * expert_i(x),
with p = softmax(router . x), or p = sigmoid(router . x) for the sigmoid targets (routing.py): the
argument below only needs the renormalised weights to sum to 1, so it holds for both. Router rows are "virtual groups" (as in NVIDIA's Megatron-Core
upcycling): all G experts of copy c share one random row r_c, so they tie and are selected
together. If K = m*G, the top-K set is m whole copies, each of whose G experts gets the same weight
w_c, with G * sum_c w_c = 1. Then
    y = sum_c w_c * sum_g G * FFN_g(x) = G * sum_c w_c * FFN(x) = FFN(x),
so the converted model reproduces the teacher. Conditions: G divides K, the virtual-group router,
and no re-initialisation (Drop-Upcycling changes the weights on purpose). With K < G only part of
each token's neurons run, so the model cannot be exact; the experts are then scaled by K instead,
so that the selected partitions add up as in the dense FFN (see `ExpertLayout.expert_scale`). (Megatron instead spreads the factor over all three
projections; silu is not homogeneous, so that is not exact for SwiGLU. Scaling only `down` is.)

Shared experts (`shared` = S > 0): the first S partitions of the (ordered) neurons form one shared
expert every token computes; the other R = G-S partitions of each copy are routed, and G above
becomes R. The shared expert's down projection carries the inverse of the target's fixed gate on
it (Qwen2-MoE multiplies it by sigmoid(w.x) with w = 0: 1/2; GLM-4.5-MoE has no gate), so the sum
stays the dense FFN.

The neuron order is contiguous, a seeded permutation, or calibrated (`clustering.py`: shared =
most important neurons, routed partitions = co-activation clusters, and fitted router rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from sparsify.convert.base import Exactness
from sparsify.convert.moe.options import ROUTER_INITS, SPLITS
from sparsify.errors import SparsifyError

if TYPE_CHECKING:
    from sparsify.convert.moe.clustering import CalibratedSplit


@dataclass(frozen=True)
class ExpertLayout:
    copies: int  # E
    granularity: int  # G
    top_k: int  # K
    shared: int = 0  # S: partitions that form the shared expert
    split: str = "contiguous"
    reinit_ratio: float = 0.0
    router_init: str = "virtual-group"
    router_std: float = 0.02
    seed: int = 0
    routing: str = "softmax"  # the target's router kind (routing.py); set by the plan once the target is chosen

    @property
    def routed_per_copy(self) -> int:
        """R = G - S routed partitions per copy."""
        return self.granularity - self.shared

    @property
    def experts(self) -> int:
        """Routed experts."""
        return self.copies * self.routed_per_copy

    @property
    def expert_scale(self) -> int:
        """Factor on each routed expert's down projection. R makes whole copies exact (K = m*R). With
        K < R a token runs only K partitions; scaling them by K makes the layer output the plain
        sum of the selected partitions, whereas R would amplify them by R/K. On SmolLM2-135M,
        G=8 K=4, held-out perplexity at conversion was 28k with K against 419k with G."""
        routed = self.routed_per_copy
        return routed if self.top_k >= routed else self.top_k

    @property
    def calibrated(self) -> bool:
        return self.split == "coactivation" or self.router_init == "calibrated"

    @property
    def active_ffn_ratio(self) -> float:
        """FFN compute per token relative to the dense model: S shared and K routed partitions of d_ff/G."""
        return (self.shared + self.top_k) / self.granularity

    def validate(self, d_ff: int) -> None:
        if self.copies < 1 or self.granularity < 1:
            raise SparsifyError("--experts and --granularity must be at least 1")
        if d_ff % self.granularity:
            divisors = [g for g in range(2, min(d_ff, 64) + 1) if d_ff % g == 0]
            raise SparsifyError(
                f"granularity {self.granularity} does not divide the FFN size d_ff={d_ff}; "
                f"choose one of {divisors}"
            )
        if not 0 <= self.shared < self.granularity:
            raise SparsifyError(f"--shared-experts {self.shared} must be at least 0 and below the granularity {self.granularity}")
        if not 1 <= self.top_k <= self.experts:
            raise SparsifyError(
                f"top-k {self.top_k} must be between 1 and the number of routed experts, {self.experts} "
                f"({self.copies} copies x {self.routed_per_copy} routed partitions)"
            )
        if not 0.0 <= self.reinit_ratio < 1.0:
            raise SparsifyError(f"--reinit-ratio must be in [0, 1), got {self.reinit_ratio}")
        if self.split not in SPLITS:
            raise SparsifyError(f"--split must be one of {', '.join(SPLITS)}, got '{self.split}'")
        if self.router_init not in ROUTER_INITS:
            raise SparsifyError(f"--router-init must be one of {', '.join(ROUTER_INITS)}, got '{self.router_init}'")
        if self.routing == "sigmoid" and self.experts < 2:
            # The sigmoid targets rank expert groups by their two best scores: one routed expert cannot be ranked.
            raise SparsifyError("sigmoid routing needs at least 2 routed experts; raise --experts or --granularity, lower --shared-experts, or use --routing softmax")

    def exactness(self) -> Exactness:
        k, r = self.top_k, self.routed_per_copy
        if self.reinit_ratio > 0:
            return Exactness(False, f"Drop-Upcycling re-initialised {self.reinit_ratio:.0%} of the neurons of copies 1..{self.copies - 1}")
        if k % r:
            if k < r:
                if not self.shared:
                    return Exactness(False, f"top-k {k} < granularity {r}: each token runs {k}/{r} of its FFN neurons")
                return Exactness(False, f"top-k {k} < {r} routed partitions: each token runs {k + self.shared}/{self.granularity} "
                                        f"of its FFN neurons ({self.shared} shared)")
            return Exactness(False, f"top-k {k} is not a multiple of the {r} routed partitions: partitions are covered unevenly")
        if r > 1 and self.router_init != "virtual-group":
            return Exactness(False, "a router without virtual groups does not select whole copies; use --router-init virtual-group")
        return Exactness(True, f"top-k {k} selects {k // r} whole cop{'y' if k == r else 'ies'} of the FFN")


def _generator(seed: int, *keys: int) -> torch.Generator:
    value = seed
    for key in keys:
        value = (value * 1_000_003 + key) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


_ROUTER, _SPLIT, _REINIT = 1, 2, 3


def neuron_order(layout: ExpertLayout, layer: int, d_ff: int, calibrated: CalibratedSplit | None = None) -> torch.Tensor | None:
    """The neuron permutation applied before partitioning (None for contiguous)."""
    if layout.split == "contiguous":
        return None
    if layout.split == "coactivation":
        return calibrated.order
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

    def __init__(self, layout: ExpertLayout, layer: int, load_ffn: Callable[[], dict[str, torch.Tensor]], dtype: torch.dtype,
                 calibrated: CalibratedSplit | None = None, shared_gate_inverse: float = 1.0):
        self.layout, self.layer, self.dtype = layout, layer, dtype
        self.calibrated = calibrated
        self.shared_gate_inverse = shared_gate_inverse  # 1 / the target's fixed gate on the shared expert
        self._load_ffn = load_ffn
        self._ffn: dict[str, torch.Tensor] | None = None
        self._copy: tuple[int, dict[str, torch.Tensor]] | None = None

    def _dense(self) -> dict[str, torch.Tensor]:
        if self._ffn is None:
            ffn = self._load_ffn()
            order = neuron_order(self.layout, self.layer, ffn["gate"].shape[0], self.calibrated)
            if order is not None:
                ffn = {"gate": ffn["gate"][order], "up": ffn["up"][order], "down": ffn["down"][:, order]}
            refitted = self.calibrated.refitted_down() if self.calibrated is not None else None
            if refitted is not None:  # already in `order` (refit.py)
                ffn["down"] = refitted.to(ffn["down"].dtype)
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
        """The router's initial weight, (routed experts, hidden)."""
        layout = self.layout
        gen = _generator(layout.seed, _ROUTER, self.layer)
        routed = layout.routed_per_copy
        if layout.router_init in ("gate-mean", "calibrated"):
            if layout.router_init == "calibrated":
                # Fitted to rank each token's partitions by their output size (clustering.fit_router).
                rows = self.calibrated.router.float()
            else:
                # Logit of partition g = mean gate pre-activation of its neurons: a token goes to the
                # partitions whose neurons it excites most, rescaled to router_std.
                gate = self._dense()["gate"].float()[layout.shared * self._partition_size():]
                rows = gate.reshape(routed, -1, hidden).mean(dim=1)
                rows = rows / rows.std() * layout.router_std
            # Copies 1.. get a little noise so that they do not tie with copy 0.
            rows = rows.repeat(layout.copies, 1)
            noise = torch.randn(rows.shape, generator=gen) * rows.std() * 0.1
            noise[:routed] = 0
            return (rows + noise).to(self.dtype)
        if layout.router_init == "virtual-group":
            rows = torch.randn(layout.copies, hidden, generator=gen) * layout.router_std
            return rows.repeat_interleave(routed, dim=0).to(self.dtype)
        return (torch.randn(layout.experts, hidden, generator=gen) * layout.router_std).to(self.dtype)

    def _partition_size(self) -> int:
        return self._dense()["gate"].shape[0] // self.layout.granularity

    def _neurons(self, weights: dict[str, torch.Tensor], role: str, rows: slice, scale: float) -> torch.Tensor:
        if role != "down":
            return weights[role][rows].to(self.dtype).contiguous()
        piece = weights[role][:, rows].to(self.dtype)
        # One rounding either way: torch multiplies low-precision floats in fp32.
        return (piece * scale).contiguous() if scale != 1 else piece.contiguous()

    def expert(self, expert: int, role: str) -> torch.Tensor:
        """Routed expert `expert` = partition S + p of copy c, for (c, p) = divmod(expert, R)."""
        copy, part = divmod(expert, self.layout.routed_per_copy)
        size = self._partition_size()
        start = (self.layout.shared + part) * size
        return self._neurons(self._copy_weights(copy), role, slice(start, start + size), self.layout.expert_scale)

    def shared_expert(self, role: str) -> torch.Tensor:
        """The first S partitions of copy 0, as one expert every token computes."""
        return self._neurons(self._dense(), role, slice(0, self.layout.shared * self._partition_size()), self.shared_gate_inverse)

    def release(self) -> None:
        self._ffn = None
        self._copy = None
