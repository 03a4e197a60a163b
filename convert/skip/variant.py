"""The implementation hooks of `--to skip` (see sparsify.convert.variant)."""

from sparsify.convert.skip.decisions import find_decisions
from sparsify.convert.skip.modeling import remote_code
from sparsify.convert.skip.plan import plan
from sparsify.convert.skip.probe import SkipGateProbe as Probe

__all__ = ["Probe", "find_decisions", "plan", "remote_code"]
