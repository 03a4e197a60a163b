"""Transition tuning: a MoT folder becomes a native MoE (Mixtral, Qwen2-MoE, Qwen3-MoE, dense layers
kept) with the controllers as routers and the experts as they are, loadable without sparsify, then
trained with the router engine against the dense teacher; bad input refused."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from support import IDS, forward_without_sparsify, sparsify_command, tiny_options

from sparsify.convert.mot.options import TransitionOptions
from sparsify.convert.mot.transition import transition
from sparsify.errors import SparsifyError
from sparsify.upcycle import upcycle


def _mot(dense, folder, layers="all", uniform=False, group_size_override=2, **options):
    """A MoT folder; `uniform`: controllers zeroed, so a Token Choice router weighs every expert alike."""
    output = upcycle(str(dense), "mot", folder, experts=4, group_size=group_size_override, layers=layers, **options).output
    if uniform:
        model = AutoModelForCausalLM.from_pretrained(output)
        for block in model.mot_blocks():
            block.controller.weight.data.zero_()
        model.save_pretrained(output)
    return output


@pytest.mark.parametrize("family,layers,architecture,dense_layers", [
    ("llama", "all", "MixtralForCausalLM", None),
    ("llama", "later-half", "Qwen2MoeForCausalLM", [0]),
    ("qwen2", "later-half", "Qwen2MoeForCausalLM", [0]),
    ("qwen3", "all", "Qwen3MoeForCausalLM", []),
])
def test_uniform_routers_over_every_expert_give_back_the_dense_model_without_sparsify(family, layers, architecture, dense_layers,
                                                                                     dense_models, tmp_path):
    """Top-k = E with equal weights 1/E and the down projections scaled by k = E: the sum of the slices, the dense FFN."""
    mot = _mot(dense_models[family], tmp_path / "mot", layers, uniform=True)
    result = transition(mot, tmp_path / "moe", TransitionOptions(top_k=4), None)
    config = json.loads((result.output / "config.json").read_text())
    assert config["architectures"] == [architecture] and config.get("mlp_only_layers") == dense_layers
    done, got = forward_without_sparsify(result.output, IDS, tmp_path, trust_remote_code=False)
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(dense_models[family]).eval()(IDS).logits
    assert got["type"] == architecture
    torch.testing.assert_close(got["logits"], expected, rtol=0, atol=1e-5)
    record = json.loads((result.output / "sparsify.json").read_text())
    assert record["variant"] == "moe" and record["layout"]["router_init"] == "mot-controller" and record["layout"]["dense_path"] is None


def test_the_controller_becomes_the_router_and_top_k_defaults_to_experts_over_group_size(dense_models, tmp_path):
    mot = _mot(dense_models["llama"], tmp_path / "mot", mix_temperature=2.0)
    result = transition(mot, tmp_path / "moe", TransitionOptions(), None)
    assert result.top_k == 2  # 4 experts / G 2
    before, after = load_file(mot / "model.safetensors"), load_file(result.output / "model.safetensors")
    # The controller's directions at row norm 0.1, whatever the mixture temperature (small logits: the chosen experts start near-equal).
    controller = before["model.layers.1.mlp.controller.weight"].T
    router = after["model.layers.1.block_sparse_moe.gate.weight"].float()
    torch.testing.assert_close(router, 0.1 * controller / controller.norm(dim=1, keepdim=True), rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(after["model.layers.1.block_sparse_moe.experts.3.w1.weight"], before["model.layers.1.mlp.gate_proj"][3])
    torch.testing.assert_close(after["model.layers.1.block_sparse_moe.experts.3.w2.weight"], before["model.layers.1.mlp.down_proj"][3] * 2)


def test_transition_training_learns_from_the_dense_source_with_the_router_losses(dense_models, corpus, tmp_path):
    mot = _mot(dense_models["qwen3"], tmp_path / "mot", group_size_override=4)
    # Top-1 of 4 (E / G): far enough from the teacher to learn. On this toy the balance loss pulls against the
    # KL (it is logged, unweighted) and the tiny options' router rate (3e-2) overshoots.
    options = tiny_options(corpus, tokens="4096", router_lr=1e-3, balance_weight=0.0, z_weight=0.0)
    result = transition(mot, tmp_path / "moe", TransitionOptions(), options)
    history = result.training.history
    assert all("balance" in entry and "z" in entry for entry in history)
    assert result.training.after["kl"] < result.training.before["kl"]
    record = json.loads((result.output / "sparsify.json").read_text())
    assert record["training"][-1]["options"]["teacher"] == str(dense_models["qwen3"])
    assert (tmp_path / "moe.run" / "moe-init" / "config.json").exists()


def test_bad_transition_input_is_refused(dense_models, tmp_path):
    with pytest.raises(SparsifyError, match="sparsify transition reads a Mixture-of-Tokens folder"):
        transition(dense_models["llama"], tmp_path / "a", TransitionOptions(), None)
    mot = _mot(dense_models["llama"], tmp_path / "mot")
    with pytest.raises(SparsifyError, match="--top-k 5 is more than the model's 4 experts"):
        transition(mot, tmp_path / "b", TransitionOptions(top_k=5), None)
    sliding = _mot(dense_models["mistral"], tmp_path / "mistral-mot", "later-half")
    with pytest.raises(SparsifyError, match="only some layers are MoT"):
        transition(sliding, tmp_path / "c", TransitionOptions(), None)
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))


def test_the_command_line_writes_the_moe_untrained_with_tokens_zero(dense_models, tmp_path):
    mot = _mot(dense_models["qwen2"], tmp_path / "mot")
    done = subprocess.run([*sparsify_command(), "transition", str(mot), "-o", str(tmp_path / "moe"), "--top-k", "3", "--tokens", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "native MoE (top-3)" in done.stdout
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["num_experts_per_tok"] == 3


def test_a_rerun_with_other_options_rewrites_the_untrained_moe_instead_of_reusing_it(dense_models, corpus, tmp_path):
    mot = _mot(dense_models["llama"], tmp_path / "mot")

    class Stop(Exception):
        pass

    def stop(entry):
        raise Stop

    with pytest.raises(Stop):  # killed before its first checkpoint: the untrained MoE stays in the run folder
        transition(mot, tmp_path / "moe", TransitionOptions(top_k=1), tiny_options(corpus, tokens="512"), train_callbacks={"on_step": stop})
    result = transition(mot, tmp_path / "moe", TransitionOptions(top_k=3), tiny_options(corpus, tokens="512"))
    assert result.top_k == 3
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["num_experts_per_tok"] == 3


def test_transition_training_defaults_to_the_low_router_rate_its_small_logits_need(dense_models, corpus, tmp_path):
    from sparsify.convert.mot.options import TRANSITION_ROUTER_LR

    mot = _mot(dense_models["llama"], tmp_path / "mot")
    result = transition(mot, tmp_path / "moe", TransitionOptions(), tiny_options(corpus, tokens="256", router_lr=None))
    record = json.loads((result.output / "sparsify.json").read_text())
    assert record["training"][-1]["options"]["router_lr"] == TRANSITION_ROUTER_LR == 1e-4
