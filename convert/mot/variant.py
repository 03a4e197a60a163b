"""The implementation hooks of `--to mot` (see sparsify.convert.variant)."""

from sparsify.convert.mot.decisions import find_decisions, quality_settings
from sparsify.convert.mot.modeling import remote_code
from sparsify.convert.mot.plan import plan
from sparsify.convert.mot.probe import MixtureProbe as Probe

__all__ = ["Probe", "find_decisions", "plan", "quality_settings", "remote_code"]
