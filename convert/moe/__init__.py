"""MoE variants: `--to moe` (Sparse Upcycling: E copies of each FFN) and `--to fine-moe`
(fine-grained experts: each FFN split into G), both written as native transformers MoE models.

options.py   conversion and router-training options (torch-free)
experts.py   the math: how a dense SwiGLU FFN becomes routed experts, and when that is exact
plan.py      the native MoE checkpoint: config and lazily produced tensors
describe.py  the `layout` record, active parameters of any MoE folder, how reports show routing (torch-free)
decisions.py routers in training: fp32 router math, the dense path, balance and z losses
probe.py     routing statistics in `sparsify eval`
variant.py   the hooks the stages call
"""

from sparsify.convert.moe.options import FineMoeOptions, MoeOptions, MoeTrainOptions
from sparsify.convert.variant import LearningRates, Metric, Variant

_SHARED = dict(
    implementation="sparsify.convert.moe.variant",
    description="sparsify.convert.moe.describe",
    train_options=MoeTrainOptions,
    step_metrics=(Metric("balance", "load-balancing loss", "bal", ".3f"), Metric("z", "router z-loss", "z", ".2f")),
)

VARIANTS = (
    Variant("moe", "Sparse Upcycling: E copies of each FFN behind a top-k router.", MoeOptions, **_SHARED),
    # Twice the untuned rates: 2M-token tune-split perplexity x1.267 -> x1.243 of the teacher (SmolLM2-135M,
    # coactivation S2/K2, bench/conversion_quality.py --tune --training lr-1e-3,lr-2e-3; docs/results.md).
    Variant("fine-moe", "Fine-grained MoE: each FFN split into G experts of d_ff/G; top-k scales with G.", FineMoeOptions,
            learning_rates=LearningRates(adapters=2e-3, decisions=1e-2), **_SHARED),
)
