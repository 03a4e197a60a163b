"""`sparsify info` counts active parameters of any MoE folder transformers can load, not only ours:
per-expert tensors (save_pretrained, sparsify) and fused 3-D expert tensors (state-dict writers such as mergekit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sparsify.checkpoint_reader import read_safetensors_header
from sparsify.errors import SparsifyError
from sparsify.info import count_params

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)

# model type -> (config, parameters a token does not use: MoE layers x unselected experts x 3 matrices of one expert).
CASES = {
    "mixtral": (dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2), 2 * (4 - 2) * 3 * 64 * 96),
    # Tied embeddings, and a shared expert of d_ff 48 that every token uses.
    "qwen2_moe": (dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
                       num_experts_per_tok=2, tie_word_embeddings=True), 2 * (4 - 2) * 3 * 64 * 32),
    "qwen3_moe": (dict(intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=1), 2 * (4 - 1) * 3 * 64 * 32),
}


def build_moe(model_type: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **COMMON, **{**CASES[model_type][0], **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_fused(model, folder: Path) -> None:
    """What a tool that saves the module's state dict writes: transformers 5 holds each layer's experts as
    mlp.experts.gate_up_proj (E, 2 d_ff, hidden) and mlp.experts.down_proj (E, hidden, d_ff); a tied head
    is written as a copy, since safetensors refuses shared storage."""
    model.config.save_pretrained(folder)
    save_file({name: t.clone().contiguous() for name, t in model.state_dict().items()}, folder / "model.safetensors", metadata={"format": "pt"})


LAYOUTS = {
    # transformers 5's save_pretrained converts back to the classic one-matrix-per-expert names.
    "per-expert": (lambda model, folder: model.save_pretrained(folder), ".experts.0."),
    "fused": (save_fused, "model.layers.0.mlp.experts.gate_up_proj"),
}


def counted(folder: Path) -> dict[str, int]:
    return count_params(folder, json.loads((folder / "config.json").read_text()))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model_type", CASES)
def test_active_parameters_leave_out_unselected_experts_in_either_layout(model_type, layout, tmp_path):
    model = build_moe(model_type)
    save, marker = LAYOUTS[layout]
    save(model, tmp_path)
    assert any(marker in name for name in read_safetensors_header(tmp_path / "model.safetensors"))
    loaded = sum(p.numel() for p in model.parameters())  # a tied head is one parameter
    assert counted(tmp_path) == {"total": loaded, "active": loaded - CASES[model_type][1]}


def test_mixtral_top_2_of_4_in_the_fused_layout_is_not_reported_all_active(tmp_path):
    # The user's report: a mergekit-style Mixtral folder showed 100% active.
    model = build_moe("mixtral")
    save_fused(model, tmp_path)
    params = counted(tmp_path)
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    assert experts == 2 * 4 * 3 * 64 * 96
    assert params["total"] - params["active"] == experts // 2 == 73_728
    assert params["active"] / params["total"] == pytest.approx(227_136 / 300_864)


def test_the_fused_folder_is_one_transformers_loads_as_it_was(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_moe("mixtral")
    save_fused(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    assert reloaded.keys() == model.state_dict().keys()
    assert all(torch.equal(reloaded[name], t) for name, t in model.state_dict().items())


def test_a_qwen2_moe_layer_left_dense_counts_as_fully_active(tmp_path):
    model = build_moe("qwen2_moe", mlp_only_layers=[0])
    model.save_pretrained(tmp_path)
    loaded = sum(p.numel() for p in model.parameters())
    assert counted(tmp_path) == {"total": loaded, "active": loaded - 1 * (4 - 2) * 3 * 64 * 32}


def test_a_moe_config_over_expert_tensors_in_an_unknown_layout_is_refused_naming_the_expected_names(tmp_path):
    model = build_moe("mixtral")
    model.config.save_pretrained(tmp_path)
    renamed = {name.replace(".mlp.experts.", ".moe.stacked."): t.clone() for name, t in model.state_dict().items()}
    save_file(renamed, tmp_path / "model.safetensors")
    with pytest.raises(SparsifyError, match=r"no tensor .* is a routed expert \(expected names matching "
                       r"model\.layers\.N\.\(block_sparse_moe\|mlp\)\.experts\.E\.w\[123\]\.weight or "
                       r"model\.layers\.N\.\(block_sparse_moe\|mlp\)\.experts\.\(gate_up\|down\)_proj\)"):
        counted(tmp_path)


def test_a_fused_tensor_stacking_other_than_the_configs_expert_count_is_refused(tmp_path):
    model = build_moe("qwen3_moe")
    save_fused(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_local_experts"] = 8
    with pytest.raises(SparsifyError, match=r"model\.layers\.\d\.mlp\.experts\.\w+ has first dimension 4, but config.json says 8 experts"):
        count_params(tmp_path, config)
