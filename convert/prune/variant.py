"""The implementation hooks of `--to prune` (see sparsify.convert.variant)."""

from sparsify.convert.prune.plan import plan

__all__ = ["plan"]
