"""Training that spends the budget well: the router-first phase and the hidden-state loss."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from support import tiny_options
from sparsify.errors import SparsifyError
from sparsify.train.hidden import capture_ffn_outputs, check_matching, ffn_modules, hidden_state_loss
from sparsify.train.loop import train
from sparsify.train.schedule import Phases, warmup_steps


def _log(result) -> dict[int, dict]:
    return {e["step"]: e for e in map(json.loads, (result.run_dir / "log.jsonl").read_text().splitlines()) if "tokens_per_s" in e}  # training steps (with --kl-weight 0 they have no "kl")


def test_adapter_schedule_starts_after_the_router_phase():
    phases = Phases(total_steps=100, warmup=0.1, router_first=0.2)
    adapters, decisions = phases.adapters(), phases.decisions()
    assert phases.router_steps == 20
    assert [adapters(s) for s in (0, 19, 20)] == [0.0, 0.0, 0.0]  # frozen, then the first warm-up step
    assert adapters(21) == pytest.approx(1 / 10)  # 10% of the remaining 80 steps is 8: raised to the 10-step minimum
    assert adapters(30) == pytest.approx(1.0) and adapters(100) == pytest.approx(0.0)
    assert decisions(10) == pytest.approx(1.0) and decisions(5) == pytest.approx(0.5)  # the decisions' schedule is unchanged
    assert [phases.adapters_frozen(step) for step in (1, 20, 21)] == [True, True, False]
    plain = Phases(total_steps=100, warmup=0.1)
    assert all(plain.adapters()(s) == plain.decisions()(s) for s in range(101))  # without the phase: one schedule


def test_short_runs_still_warm_up():
    assert [warmup_steps(0.05, steps) for steps in (19, 61, 200, 1000)] == [4, 10, 10, 50]
    assert warmup_steps(0.0, 19) == 0  # no warm-up, when asked for
    assert Phases(total_steps=19, warmup=0.05).decisions()(1) == pytest.approx(1 / 4)


def test_router_first_trains_the_routers_alone_then_the_adapters(students, corpus, tmp_path):
    # 12 steps; half of them router-only. Fresh LoRA adapters compute exactly zero (lora_B = 0), so while
    # they are frozen the run must follow, step by step, the run that has no adapters at all.
    first = train(students["half"], tiny_options(corpus, router_first=0.5), output=tmp_path / "first")
    routers_only = train(students["half"], tiny_options(corpus, lora_rank=0), output=tmp_path / "routers")
    together = train(students["half"], tiny_options(corpus), output=tmp_path / "together")
    a, b, c = _log(first), _log(routers_only), _log(together)
    assert len(a) == 12
    for step in range(1, 8):  # step 7's loss is computed before the adapters' first update
        assert a[step]["kl"] == pytest.approx(b[step]["kl"], rel=1e-5, abs=1e-7), step
        if step <= 6:  # a frozen adapter has no gradient, so it does not count in the clipping norm either
            assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-4), step
    # The adapters' rate for the next step: 0 while frozen and at the start of their 1-step warm-up, then up.
    assert all(a[step]["lr"] == 0.0 for step in range(1, 7)) and a[7]["lr"] > 0
    assert a[12]["kl"] != pytest.approx(b[12]["kl"], rel=1e-4)  # then the adapters train
    assert c[5]["kl"] != pytest.approx(b[5]["kl"], rel=1e-4)  # without the phase they train from the start (3-step warm-up)


def test_hidden_state_loss_is_normalised_per_layer():
    teacher = {0: torch.ones(2, 3, 4), 1: 10 * torch.ones(2, 3, 4)}
    assert hidden_state_loss(teacher, teacher).item() == 0.0
    # The same relative error in a small and a large layer weighs the same.
    student = {0: 1.1 * teacher[0], 1: 1.1 * teacher[1]}
    assert hidden_state_loss(student, teacher).item() == pytest.approx(0.01)
    assert hidden_state_loss({0: student[0]}, teacher).item() == pytest.approx(0.01)  # only layers both ran
    with pytest.raises(SparsifyError, match="no layer ran its FFN in both"):
        hidden_state_loss({}, teacher)


def test_ffn_capture_finds_each_layer_through_wrappers(students):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(students["half"]).eval()
    layers = model.config.num_hidden_layers
    assert sorted(ffn_modules(nn.ModuleDict({"wrapped": model}))) == list(range(layers))
    with torch.no_grad(), capture_ffn_outputs(model) as outputs:
        model(torch.randint(0, 4000, (2, 8)))
    assert sorted(outputs) == list(range(layers)) and outputs[0].shape == (2, 8, model.config.hidden_size)
    assert not model.model.layers[0].mlp._forward_hooks  # removed on exit
    with pytest.raises(SparsifyError, match="student has 2 FFN layers and the teacher 1"):
        check_matching(model, nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"mlp": nn.Linear(2, 2)})])}))


def test_hidden_loss_is_zero_on_an_exact_conversion_and_trains_a_wrong_one(students, corpus, tmp_path):
    exact = _log(train(students["exact"], tiny_options(corpus, tokens="128", hidden_weight=1.0), output=tmp_path / "exact"))
    assert exact[1]["hidden"] < 1e-10  # every FFN computes its dense original: nothing to match
    wrong = train(students["misrouted"], tiny_options(corpus, tokens="4096", eval_tokens="1024", kl_weight=0.0, hidden_weight=1.0),
                  output=tmp_path / "wrong")
    log = _log(wrong)
    first, last = [log[s]["hidden"] for s in (1, 2, 3)], [log[s]["hidden"] for s in sorted(log)[-3:]]
    assert sum(last) < 0.8 * sum(first)
    assert wrong.after["kl"] < wrong.before["kl"]  # matching the FFN outputs alone also brings the logits closer


def test_hidden_loss_against_a_separate_teacher_equals_the_self_teacher(students, corpus, tmp_path):
    source = json.loads((students["half"] / "sparsify.json").read_text())["source"]["path"]
    own = _log(train(students["half"], tiny_options(corpus, tokens="128", hidden_weight=1.0), output=tmp_path / "own"))
    separate = _log(train(students["half"], tiny_options(corpus, tokens="128", hidden_weight=1.0, teacher=source),
                          output=tmp_path / "separate"))
    assert own[1]["hidden"] > 1e-3
    assert separate[1]["hidden"] == pytest.approx(own[1]["hidden"], rel=1e-4)
