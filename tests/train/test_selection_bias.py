"""Loss-free balancing: routers with a selection bias (--routing sigmoid) move it towards equal load
after every step; the bias is checkpointed, resumed, and saved with the trained model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from support import tiny_options
from sparsify.convert.moe.routing import RouterSettings, balance_bias_step, expert_load, route
from sparsify.train.loop import train
from sparsify.upcycle import upcycle

BIAS = "model.layers.{layer}.mlp.gate.e_score_correction_bias"


def test_bias_steps_even_out_a_skewed_router_without_touching_its_weights():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 8, generator=generator) * 0.3 + torch.linspace(0, 1.5, 8)  # experts 6 and 7 favoured
    settings, bias = RouterSettings("sigmoid", 2), torch.zeros(8)

    def imbalance() -> float:
        load = expert_load(route(logits, settings, bias)[1], 8).float()
        return float(load.max() / load.mean())

    before = imbalance()
    for _ in range(600):
        balance_bias_step(bias, expert_load(route(logits, settings, bias)[1], 8), rate=0.003)
    assert before > 3 and imbalance() < 1.1  # measured: 3.45 -> 1.05
    # The bias only chooses: a chosen expert's weight is its own score, renormalised.
    weights, index = route(logits, settings, bias)
    scores = torch.sigmoid(logits).gather(1, index)
    torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True))


@pytest.fixture(scope="module")
def sigmoid_student(dense_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sigmoid-student")
    return upcycle(str(dense_models["llama"]), "fine-moe", folder / "model", granularity=4, top_k=1, shared_experts=1,
                   routing="sigmoid").output


def test_after_step_lowers_the_bias_of_the_busiest_expert_in_its_own_layer(sigmoid_student):
    from transformers import AutoModelForCausalLM

    from sparsify.convert.moe.decisions import Routers, prepare_routers
    from sparsify.convert.moe.options import MoeTrainOptions

    routers = prepare_routers(AutoModelForCausalLM.from_pretrained(sigmoid_student))
    decisions = Routers(routers, MoeTrainOptions(bias_rate=0.01))
    routers[0].sparsify_load += torch.tensor([9, 1, 2])  # expert 0 busy in layer 0
    routers[1].sparsify_load += torch.tensor([1, 2, 9])  # expert 2 busy in layer 1
    logged = decisions.after_step(1)
    assert routers[0].e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01])
    assert routers[1].e_score_correction_bias.tolist() == pytest.approx([0.01, 0.01, -0.01])
    assert logged["load_max_over_mean"] == pytest.approx(9 / 4) and logged["selection_bias_abs"] == pytest.approx(0.01)
    assert not any(router.sparsify_load.any() for router in routers)  # counted afresh for the next step


def _biases(folder) -> list[torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        return [weights.get_tensor(BIAS.format(layer=layer)) for layer in range(2)]


class _Stop(Exception):
    pass


def test_training_moves_the_bias_and_a_resumed_run_follows_the_same_curve(sigmoid_student, corpus, tmp_path):
    options = tiny_options(corpus, tokens="1024", checkpoint_every=3, bias_rate=0.01)
    straight = train(sigmoid_student, options, output=tmp_path / "straight")
    log = [json.loads(line) for line in (straight.run_dir / "log.jsonl").read_text().splitlines()]
    steps = [entry for entry in log if "kl" in entry]
    assert len(steps) == 8 and all(entry["load_max_over_mean"] >= 1 for entry in steps)
    # Logged every step; it moves by +-rate per expert and step, so it can pass through 0 on the way.
    assert all("selection_bias_abs" in entry for entry in steps) and max(entry["selection_bias_abs"] for entry in steps) > 0
    trained = _biases(straight.output)
    assert all(bias.abs().max() > 0 for bias in trained)  # moved, and saved with the merged model
    assert all(bias.abs().max() <= 8 * 0.01 + 1e-6 for bias in trained)  # one rate-sized move per step at most

    def stop_after_four(entry):
        if entry["step"] == 4:
            raise _Stop

    with pytest.raises(_Stop):
        train(sigmoid_student, options, output=tmp_path / "killed", on_step=stop_after_four)
    with safe_open(str(tmp_path / "killed.run" / "checkpoint" / "trainable.safetensors"), "pt") as checkpoint:
        assert any(name.endswith("e_score_correction_bias") for name in checkpoint.keys())
    resumed = train(sigmoid_student, options, output=tmp_path / "killed", resume=True)
    assert resumed.start_step == 3
    curve = {e["step"]: (e["kl"], e["selection_bias_abs"]) for e in steps}
    again = [json.loads(line) for line in (resumed.run_dir / "log.jsonl").read_text().splitlines()]
    assert {e["step"]: (e["kl"], e["selection_bias_abs"]) for e in again if "kl" in e} == curve
    for got, want in zip(_biases(resumed.output), trained):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bias_rate_zero_keeps_the_biases_at_zero(sigmoid_student, corpus, tmp_path):
    result = train(sigmoid_student, tiny_options(corpus, tokens="512", bias_rate=0.0), output=tmp_path / "out")
    assert not any(bias.any() for bias in _biases(result.output))


def test_an_exact_sigmoid_student_starts_as_its_own_teacher(dense_models, corpus, tmp_path):
    exact = upcycle(str(dense_models["qwen3"]), "fine-moe", tmp_path / "exact", granularity=4, top_k=3, shared_experts=1)
    result = train(exact.output, tiny_options(corpus, tokens="128"), output=tmp_path / "out")
    assert result.before["kl"] < 1e-6
