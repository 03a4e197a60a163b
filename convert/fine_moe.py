"""`--to fine-moe`: fine-grained MoE (Krajewski et al., 2024, "Scaling Laws for Fine-Grained MoE").

Granularity G splits each FFN's d_ff neurons into G experts of d_ff/G; E copies give E*G experts,
and top-k scales with G (default K = G: exactly the dense FFN compute). The construction and the
exactness condition (G divides K, virtual-group router, no re-initialisation) are in experts.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsify.convert.experts import ExpertInitOptions, ExpertLayout
from sparsify.convert.native_moe import plan_native_moe
from sparsify.convert.plan import ConversionPlan


@dataclass
class FineMoeOptions(ExpertInitOptions):
    granularity: int = field(default=8, metadata={"help": "G: split each FFN into G experts of d_ff/G neurons."})
    experts: int = field(default=1, metadata={"help": "E: copies of the FFN; the model gets E*G experts."})
    top_k: int | None = field(default=None, metadata={"help": "Experts per token; default G (the dense FFN compute)."})
    split: str = field(
        default="contiguous",
        metadata={"help": "How neurons are assigned to partitions: contiguous or random (seeded permutation)."},
    )
    router_init: str | None = field(
        default=None,
        metadata={
            "help": "virtual-group (a copy's experts share a router row; exact when G divides top-k), random, or "
            "gate-mean (partition g's row is the mean of its neurons' gate rows); default: virtual-group when "
            "G divides top-k, else gate-mean."
        },
    )

    def layout(self) -> ExpertLayout:
        top_k = self.granularity if self.top_k is None else self.top_k
        router_init = self.router_init or ("virtual-group" if top_k % self.granularity == 0 else "gate-mean")
        return ExpertLayout(
            copies=self.experts,
            granularity=self.granularity,
            top_k=top_k,
            split=self.split,
            reinit_ratio=self.reinit_ratio,
            router_init=router_init,
            router_std=self.router_std,
            seed=self.seed,
        )


def plan(source, options: FineMoeOptions, dtype: torch.dtype) -> ConversionPlan:
    return plan_native_moe(source, options.layout(), dtype, tags=["fine-grained-moe"])
