"""Data-driven conversions: calibration layer by layer, co-activation experts, shared experts in a
native target, fitted routers, refitted down projections, and static pruning (tiny models, real text)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparsify.convert.calibration.options import CalibrationOptions
from sparsify.convert.calibration.runner import calibration_blocks, layer_activity
from sparsify.convert.moe.clustering import balanced_kmeans, fit_router
from sparsify.convert.moe.refit import refit_down
from sparsify.errors import SparsifyError
from sparsify.sources import open_source
from sparsify.upcycle import upcycle

PROMPT = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 429, 2940, 12], [1, 9, 99, 999, 4000, 12000, 20, 3, 77, 5, 6, 7]])


def _logits(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(PROMPT).logits


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> float:
    return float(torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean"))


def test_the_layer_by_layer_runner_sees_what_the_whole_model_sees(dense_models, corpus):
    options = CalibrationOptions(calibration_data=str(corpus["train"]), calibration_tokens="256", calibration_seq_len=64)
    source = open_source(str(dense_models["qwen3"]))
    blocks = calibration_blocks(source, options)
    assert blocks.shape == (4, 64)
    model = AutoModelForCausalLM.from_pretrained(dense_models["qwen3"], dtype=torch.float32).eval()
    seen = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda module, args, i=i: seen.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(blocks)
    layers = list(layer_activity(source, blocks, device=torch.device("cpu")))
    assert [a.layer for a in layers] == [0, 1]
    for activity in layers:
        torch.testing.assert_close(activity.ffn_input, torch.cat(seen[activity.layer]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(activity.ffn["gate"], model.model.layers[activity.layer].mlp.gate_proj.weight)


def test_balanced_kmeans_finds_planted_groups_in_equal_sizes():
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 32, generator=generator), dim=1)
    truth = torch.arange(4).repeat_interleave(16)[torch.randperm(64, generator=generator)]
    profiles = torch.nn.functional.normalize(centres[truth] + 0.1 * torch.randn(64, 32, generator=generator), dim=1)
    found = balanced_kmeans(profiles, 4, seed=1)
    assert torch.bincount(found, minlength=4).tolist() == [16, 16, 16, 16]
    for group in range(4):  # each found group is one planted group
        assert len(set(truth[found == group].tolist())) == 1


def test_the_fitted_router_ranks_experts_like_their_outputs_and_keeps_logits_small():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=generator)
    true_rows = torch.randn(5, 16, generator=generator)
    norms = (x @ true_rows.T).exp()  # any increasing function of a linear score
    rows = fit_router(x, norms, logit_std=0.1)
    logits = x @ rows.T
    assert abs(float(logits.std()) - 0.1) < 1e-3
    assert (logits.argmax(1) == norms.argmax(1)).float().mean() > 0.8


def test_refitting_the_down_projection_reproduces_the_dense_output_better():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=generator)
    gate, up = torch.randn(12, 16, generator=generator) / 4, torch.randn(12, 16, generator=generator) / 4
    # The dropped neurons 12..23 nearly repeat the kept ones: their contribution is recoverable, as
    # co-active neurons' is in a real FFN.
    ffn = {"gate": torch.cat([gate, gate + 0.01 * torch.randn(12, 16, generator=generator)]),
           "up": torch.cat([up, up + 0.01 * torch.randn(12, 16, generator=generator)]),
           "down": torch.randn(16, 24, generator=generator) / 4}
    kept = torch.arange(12)
    part = {role: ffn[role][kept] for role in ("gate", "up")}

    def features(chunk):
        return torch.nn.functional.silu(chunk @ part["gate"].T) * (chunk @ part["up"].T)

    target = (torch.nn.functional.silu(x @ ffn["gate"].T) * (x @ ffn["up"].T)) @ ffn["down"].T
    before = (features(x) @ ffn["down"][:, kept].T - target).pow(2).mean()
    down = refit_down(x, ffn, ffn["down"][:, kept], features)
    after = (features(x) @ down.T - target).pow(2).mean()
    assert after < 0.05 * before
    # With every neuron kept there is nothing to repair: the dense weights come back.
    full = refit_down(x, ffn, ffn["down"], lambda chunk: torch.nn.functional.silu(chunk @ ffn["gate"].T) * (chunk @ ffn["up"].T))
    torch.testing.assert_close(full, ffn["down"], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shared_experts_go_to_qwen2_moe_and_stay_exact_when_every_routed_expert_runs(dense_weights, tmp_path, family):
    result = upcycle(str(dense_weights[family]), "fine-moe", tmp_path / "out", granularity=4, shared_experts=1, top_k=3)
    assert result.plan.exactness.exact, result.plan.exactness.reason
    config = json.loads((result.output / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["shared_expert_intermediate_size"] == 24 and config["num_experts"] == 3
    assert config["qkv_bias"] is (family == "qwen2")
    torch.testing.assert_close(_logits(result.output), _logits(dense_weights[family]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("routing", ["softmax", "sigmoid"])
def test_coactivation_split_with_shared_experts_is_recorded_and_closer_than_contiguous(dense_models, corpus, tmp_path, routing):
    calibration = dict(calibration_data=str(corpus["train"]), calibration_tokens="2k", calibration_seq_len=128)
    common = dict(granularity=4, top_k=1, shared_experts=1, routing=routing)
    teacher = _logits(dense_models["llama"])
    plain = upcycle(str(dense_models["llama"]), "fine-moe", tmp_path / "plain", **common)
    calibrated = upcycle(str(dense_models["llama"]), "fine-moe", tmp_path / "calibrated", **common, **calibration)
    record = json.loads((calibrated.output / "sparsify.json").read_text())["layout"]
    assert record["split"]["strategy"] == "coactivation" and record["router_init"] == "calibrated" and record["routing"] == routing
    assert record["shared_experts"] == 1 and record["calibration"]["tokens"] == 2000 and record["calibration"]["refit"] is True
    assert len(record["calibration"]["layers"]) == 2 and record["dense_path"] is None  # refitted: the source is the teacher
    assert 0 < record["calibration"]["mean_routed_share_router"] <= record["calibration"]["mean_routed_share_best"] + 1e-6
    assert _kl(teacher, _logits(calibrated.output)) < _kl(teacher, _logits(plain.output))


def test_pruning_keeps_the_most_important_neurons_as_a_smaller_dense_model(dense_models, corpus, tmp_path):
    whole = upcycle(str(dense_models["llama"]), "prune", tmp_path / "whole", keep=1.0)
    assert whole.plan.exactness.exact
    torch.testing.assert_close(_logits(whole.output), _logits(dense_models["llama"]), rtol=0, atol=1e-5)
    half = upcycle(str(dense_models["llama"]), "prune", tmp_path / "half", keep=0.5, calibration_data=str(corpus["train"]),
                   calibration_tokens="1k", calibration_seq_len=128)
    config = json.loads((half.output / "config.json").read_text())
    assert config["model_type"] == "llama" and config["intermediate_size"] == 48
    layout = json.loads((half.output / "sparsify.json").read_text())["layout"]
    assert layout["importance"] == "calibration" and layout["kept_d_ff"] == 48
    by_weights = upcycle(str(dense_models["llama"]), "prune", tmp_path / "weights", keep=0.5)
    assert json.loads((by_weights.output / "sparsify.json").read_text())["layout"]["importance"] == "weights"


@pytest.mark.parametrize("options, message", [
    (dict(to="fine-moe", split="coactivation"), "--calibration-data"),
    (dict(to="fine-moe", granularity=4, shared_experts=4), "--shared-experts 4"),
    (dict(to="fine-moe", granularity=4, shared_experts=1, top_k=4), "routed experts"),
    (dict(to="prune", keep=0), "--keep"),
    (dict(to="fine-moe", granularity=4, experts=2, top_k=2, router_init="calibrated", calibration_data="{corpus}"), "--experts 1"),
])
def test_bad_calibration_options_get_one_line_errors(dense_weights, corpus, tmp_path, options, message):
    options = {k: v.format(corpus=corpus["train"]) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(SparsifyError, match=message) as error:
        upcycle(str(dense_weights["llama"]), options.pop("to"), tmp_path / "out", **options)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, routing, message", [
    ("qwen3", "softmax", "no native target of qwen3 has a shared expert and softmax routing; use --routing sigmoid"),
    ("mistral", None, "sliding_window"),
    ("mistral", "sigmoid", "sliding_window"),
])
def test_shared_experts_are_refused_where_no_native_target_represents_them(dense_weights, tmp_path, family, routing, message):
    with pytest.raises(SparsifyError, match=message) as error:
        upcycle(str(dense_weights[family]), "fine-moe", tmp_path / "out", granularity=4, shared_experts=1, routing=routing)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_training_takes_the_source_as_teacher_when_the_weights_no_longer_hold_it(dense_models, corpus, tmp_path):
    from sparsify.provenance import read_record
    from sparsify.train.loop import converted_from

    exact = upcycle(str(dense_models["llama"]), "fine-moe", tmp_path / "exact", granularity=4)
    pruned = upcycle(str(dense_models["llama"]), "prune", tmp_path / "pruned", keep=0.5)
    refitted = upcycle(str(dense_models["llama"]), "fine-moe", tmp_path / "refit", granularity=4, top_k=2,
                       calibration_data=str(corpus["train"]), calibration_tokens="2k", calibration_seq_len=128)
    assert converted_from(read_record(exact.output)) is None  # its dense path is the teacher
    assert converted_from(read_record(pruned.output)) == str(dense_models["llama"])
    assert converted_from(read_record(refitted.output)) == str(dense_models["llama"])
