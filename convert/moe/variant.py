"""The implementation hooks of `--to moe` and `--to fine-moe` (see sparsify.convert.variant)."""

from sparsify.convert.moe.decisions import find_decisions
from sparsify.convert.moe.plan import plan
from sparsify.convert.moe.probe import ExpertRoutingProbe as Probe
from sparsify.convert.moe.probe import active_expert_share

__all__ = ["Probe", "active_expert_share", "find_decisions", "plan"]
