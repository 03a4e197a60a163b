"""--lr and --router-lr: given values win; otherwise the converted model's variant supplies its tuned rates."""

from __future__ import annotations

import pytest

from sparsify.convert import VARIANTS
from sparsify.convert.variant import UNTUNED_LEARNING_RATES, LearningRates
from sparsify.errors import SparsifyError
from sparsify.train.options import TrainOptions


def rates(options: TrainOptions) -> tuple[float, float]:
    return options.optimisation.lr, options.optimisation.router_lr


def test_unset_rates_come_from_the_variant_and_given_ones_win():
    tuned = LearningRates(adapters=2e-3, decisions=1e-2)
    assert rates(TrainOptions.of()) == (None, None)  # "auto" until the model is known
    assert rates(TrainOptions.of().with_learning_rates(tuned)) == (2e-3, 1e-2)
    assert rates(TrainOptions.of(lr=5e-4).with_learning_rates(tuned)) == (5e-4, 1e-2)
    assert rates(TrainOptions.of(router_lr=3e-2).with_learning_rates(tuned)) == (2e-3, 3e-2)
    untuned = (UNTUNED_LEARNING_RATES.adapters, UNTUNED_LEARNING_RATES.decisions)
    assert rates(TrainOptions.of().with_learning_rates(None)) == untuned == (1e-3, 5e-3)  # a model sparsify did not convert


def test_the_tuned_rates_are_registered_only_where_they_were_measured():
    # fine-moe and prune: bench/conversion_quality.py --tune (docs/results.md); the others keep the untuned rates.
    assert VARIANTS["fine-moe"].learning_rates == LearningRates(2e-3, 1e-2)
    assert VARIANTS["prune"].learning_rates.adapters == 2e-3
    assert VARIANTS["moe"].learning_rates == VARIANTS["skip"].learning_rates == UNTUNED_LEARNING_RATES


@pytest.mark.parametrize("flag", ["lr", "router_lr"])
def test_a_given_rate_must_still_be_positive(flag):
    with pytest.raises(SparsifyError, match=f"--{flag.replace('_', '-')} 0.0: must be greater than 0"):
        TrainOptions.of(**{flag: 0.0}).optimisation.validate()
