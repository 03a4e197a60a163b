"""Fast execution of routed experts: sparsify's grouped implementation, LoRA on experts as
low-rank GEMMs, and which implementation runs where (registered with transformers' experts
interface, so checkpoints stay native)."""

from sparsify.experts.registry import IMPLEMENTATION, execution_path, preferred_implementation, register, use_fast_experts

__all__ = ["IMPLEMENTATION", "execution_path", "preferred_implementation", "register", "use_fast_experts"]
