"""`--to fine-moe`: fine-grained MoE (Krajewski et al., 2024, "Scaling Laws for Fine-Grained MoE").

Granularity G splits each FFN's d_ff neurons into G experts of d_ff/G; E copies give E*G experts,
and top-k scales with G (default K = G: exactly the dense FFN compute). The construction and the
exactness condition (G divides K, virtual-group router, no re-initialisation) are in experts.py.
"""

from __future__ import annotations

import torch

from sparsify.convert.native_moe import plan_native_moe
from sparsify.convert.options import FineMoeOptions
from sparsify.convert.plan import ConversionPlan


def plan(source, options: FineMoeOptions, dtype: torch.dtype) -> ConversionPlan:
    return plan_native_moe(source, options.layout(), dtype, tags=["fine-grained-moe"])
