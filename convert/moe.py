"""`--to moe`: Sparse Upcycling (Komatsuzaki et al., 2022) with optional Drop-Upcycling.

Every expert is a full copy of the dense FFN; a fresh top-k router. Because the routing weights of
the selected experts are renormalised to sum to 1 and all experts are equal, the converted model
computes exactly the teacher's function for any router and any k (see experts.py), until
`--reinit-ratio` (Drop-Upcycling, Nakamura et al., 2025) re-draws part of each copy's neurons to
diversify the experts.
"""

from __future__ import annotations

import torch

from sparsify.convert.native_moe import plan_native_moe
from sparsify.convert.options import MoeOptions
from sparsify.convert.plan import ConversionPlan


def plan(source, options: MoeOptions, dtype: torch.dtype) -> ConversionPlan:
    return plan_native_moe(source, options.layout(), dtype, tags=["sparse-upcycling"])
