"""`--to moe`: Sparse Upcycling (Komatsuzaki et al., 2022) with optional Drop-Upcycling.

Every expert is a full copy of the dense FFN; a fresh top-k router. Because the routing weights of
the selected experts are renormalised to sum to 1 and all experts are equal, the converted model
computes exactly the teacher's function for any router and any k (see experts.py), until
`--reinit-ratio` (Drop-Upcycling, Nakamura et al., 2025) re-draws part of each copy's neurons to
diversify the experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsify.convert.experts import ExpertInitOptions, ExpertLayout
from sparsify.convert.native_moe import plan_native_moe
from sparsify.convert.plan import ConversionPlan


@dataclass
class MoeOptions(ExpertInitOptions):
    experts: int = field(default=8, metadata={"help": "Number of experts; each starts as a copy of the FFN."})
    top_k: int = field(default=2, metadata={"help": "Experts each token is routed to."})

    def layout(self) -> ExpertLayout:
        return ExpertLayout(
            copies=self.experts,
            granularity=1,
            top_k=self.top_k,
            reinit_ratio=self.reinit_ratio,
            router_std=self.router_std,
            seed=self.seed,
        )


def plan(source, options: MoeOptions, dtype: torch.dtype) -> ConversionPlan:
    return plan_native_moe(source, options.layout(), dtype, tags=["sparse-upcycling"])
