"""Static FFN pruning, `--to prune`: every layer keeps the same most important fraction of its FFN
neurons for every token, as a plain dense model of the source's own architecture.

It is the baseline a routed model must beat (a routed model that cannot is not earning its
routing), and a small dense model in its own right. Importance comes from calibration text when
given (the same statistics `fine-moe --split coactivation` uses), else from the weights.

options.py   conversion options (torch-free)
plan.py      the pruned checkpoint: config with the smaller d_ff, FFN rows and columns kept
describe.py  the `layout` record (torch-free)
variant.py   the hooks the stages call
"""

from sparsify.convert.prune.options import PruneOptions
from sparsify.convert.variant import UNTUNED_LEARNING_RATES, LearningRates, Variant

VARIANTS = (
    Variant(
        "prune",
        "Static FFN pruning: keep the most important fraction of each FFN's neurons (a dense model; the baseline for fine-moe).",
        PruneOptions,
        implementation="sparsify.convert.prune.variant",
        description="sparsify.convert.prune.describe",
        decides="nothing (a dense model: it trains with LoRA against its source)",
        # Twice the untuned adapter rate: 2M-token tune-split perplexity x1.252 -> x1.212 of the teacher
        # (SmolLM2-135M, keep 0.5, bench/conversion_quality.py --tune --training lr-1e-3,lr-2e-3; docs/results.md).
        learning_rates=LearningRates(adapters=2e-3, decisions=UNTUNED_LEARNING_RATES.decisions),
    ),
)
