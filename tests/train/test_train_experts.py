"""`--train-experts full`: the expert weights themselves train (so an upcycled MoE's copies can diverge),
against the source model as teacher; the trained weights are checkpointed and saved."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from support import tiny_options
from sparsify.errors import SparsifyError
from sparsify.train.loop import train
from sparsify.upcycle import upcycle

EXPERT = "model.layers.0.block_sparse_moe.experts.{expert}.w1.weight"


def _tensors(folder, names):
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        return {name: weights.get_tensor(name) for name in names}


@pytest.fixture(scope="module")
def upcycled(dense_models, tmp_path_factory):
    """Three identical copies of the FFN, top-1: exact, and a model whose experts can only differ by training."""
    return upcycle(str(dense_models["llama"]), "moe", tmp_path_factory.mktemp("upcycled") / "moe", experts=3, top_k=1).output


def test_full_expert_training_moves_the_copies_apart_and_learns_from_the_source(upcycled, dense_models, corpus, tmp_path):
    options = tiny_options(corpus, tokens="1024", train_experts="full", expert_lr=1e-3, ce_weight=1.0, lora_targets="attention")
    result = train(upcycled, options, output=tmp_path / "out")
    names = [EXPERT.format(expert=e) for e in range(3)]
    before, after = _tensors(upcycled, names), _tensors(result.output, names)
    assert all(torch.equal(before[names[0]], before[name]) for name in names)  # upcycled: identical copies
    assert all(not torch.equal(before[name], after[name]) for name in names)  # every copy trained
    assert not torch.equal(after[names[0]], after[names[1]])  # and they no longer agree
    assert after[names[0]].dtype == before[names[0]].dtype  # saved back from the fp32 master copy
    record = json.loads((result.output / "sparsify.json").read_text())
    assert record["training"][0]["options"]["train_experts"] == "full"
    assert result.before["kl"] < 1e-6  # the teacher is the source, which the exact conversion reproduces


def test_full_expert_training_needs_a_teacher_outside_the_weights(upcycled, corpus, tmp_path):
    trained = train(upcycled, tiny_options(corpus, tokens="128"), output=tmp_path / "trained").output  # no longer a fresh conversion
    with pytest.raises(SparsifyError, match="--train-experts full .* pass --teacher") as error:
        train(trained, tiny_options(corpus, tokens="128", train_experts="full"), output=tmp_path / "again")
    assert "\n" not in str(error.value)


def test_train_experts_is_checked(corpus):
    with pytest.raises(SparsifyError, match="--train-experts must be one of lora, full"):
        tiny_options(corpus, train_experts="some").validate()


class _Stop(Exception):
    pass


def test_a_killed_full_expert_run_resumes_to_the_same_weights(upcycled, corpus, tmp_path):
    options = tiny_options(corpus, tokens="768", train_experts="full", expert_lr=1e-3, ce_weight=1.0, checkpoint_every=2)
    straight = train(upcycled, options, output=tmp_path / "straight")

    def stop_after_three(entry):
        if entry["step"] == 3:
            raise _Stop

    with pytest.raises(_Stop):
        train(upcycled, options, output=tmp_path / "killed", on_step=stop_after_three)
    resumed = train(upcycled, options, output=tmp_path / "killed", resume=True)
    assert resumed.start_step == 2
    names = [EXPERT.format(expert=e) for e in range(3)]
    for name, want in _tensors(straight.output, names).items():
        torch.testing.assert_close(_tensors(resumed.output, [name])[name], want, rtol=0, atol=0)
