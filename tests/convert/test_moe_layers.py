"""`--layers` of `moe` / `fine-moe`: only the chosen FFNs become MoE, the others stay dense FFNs of a
native target that holds dense layers (Qwen2-MoE / Qwen3-MoE `mlp_only_layers`), exact where the
layout is, trainable, and described with the model's own layer numbers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from support import tiny_options
from transformers import AutoModelForCausalLM

from sparsify.errors import SparsifyError
from sparsify.upcycle import upcycle

PROMPT_IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 429, 2940, 12]])


def _logits(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(PROMPT_IDS).logits


@pytest.mark.parametrize(("family", "target"), [("llama", "qwen2_moe"), ("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe")])
@pytest.mark.parametrize("to", ["fine-moe", "moe"])
def test_only_the_chosen_layers_become_moe_and_the_model_stays_exact(dense_weights, tmp_path, family, target, to):
    options = dict(granularity=4) if to == "fine-moe" else dict(experts=3, top_k=1)
    result = upcycle(str(dense_weights[family]), to, tmp_path / "out", layers="later-half", **options)
    assert result.plan.exactness.exact, result.plan.exactness.reason
    config = json.loads((result.output / "config.json").read_text())
    assert config["model_type"] == target and config["mlp_only_layers"] == [0]
    with safe_open(result.output / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.gate_proj.weight" in names and not any(n.startswith("model.layers.0.mlp.experts.") for n in names)
    assert "model.layers.1.mlp.gate.weight" in names and "model.layers.1.mlp.gate_proj.weight" not in names
    torch.testing.assert_close(_logits(result.output), _logits(dense_weights[family]), rtol=0, atol=1e-4)
    layout = json.loads((result.output / "sparsify.json").read_text())["layout"]
    assert layout["layers"] == [1]


def test_a_calibrated_split_of_some_layers_records_those_layers_and_trains(dense_models, corpus, tmp_path):
    from sparsify.convert.moe.probe import ExpertRoutingProbe
    from sparsify.info import layout_rows
    from sparsify.train.loop import train

    result = upcycle(str(dense_models["llama"]), "fine-moe", tmp_path / "out", granularity=4, top_k=2, layers="1",
                     calibration_data=str(corpus["train"]), calibration_tokens="2k", calibration_seq_len=128)
    layout = json.loads((result.output / "sparsify.json").read_text())["layout"]
    assert layout["split"]["strategy"] == "coactivation" and layout["router_init"] == "calibrated"
    assert len(layout["calibration"]["layers"]) == 1  # the figures of the one MoE layer
    rows = dict(layout_rows("fine-moe", layout))
    assert rows["MoE layers"] == "1 (the others dense)"
    trained = train(result.output, tiny_options(corpus), output=tmp_path / "trained")
    assert trained.steps > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "trained", dtype=torch.float32).eval()
    probe = ExpertRoutingProbe.find(model)
    assert probe.layers == [1]
    probe.attach()
    with torch.no_grad():
        model(PROMPT_IDS)
    probe.detach()
    assert [layer["layer"] for layer in probe.summary()["layers"]] == [1]


@pytest.mark.parametrize(("family", "options", "message"), [
    ("llama", dict(layers="0-4"), r"--layers 0-4 names layers outside 0-1"),
    ("llama", dict(layers="top"), r"--layers takes later-half, all or indices"),
    ("llama", dict(layers="1-0"), r"range 1-0 runs backwards"),
    ("llama", dict(layers="later-half", routing="sigmoid"), r"makes every layer an MoE; converting only some layers needs"),
    ("mistral", dict(layers="later-half"), r"sliding_window=8"),  # Qwen2-MoE would drop the sliding window
])
def test_layer_choices_a_target_cannot_hold_are_refused_in_one_line(dense_weights, tmp_path, family, options, message):
    with pytest.raises(SparsifyError, match=message):
        upcycle(str(dense_weights[family]), "fine-moe", tmp_path / "out", granularity=4, **options)
    assert not (tmp_path / "out").exists()
