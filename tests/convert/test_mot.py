"""Mixture of Tokens: exact at group size 1 on every family (with and without sparsify installed),
mixing only across the batch at one position, padding and dummy rows never weighted, cached decoding
equal to recomputation for a fixed batch, the group-size schedule, bad options refused."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import IDS, forward_without_sparsify, tiny_options

from sparsify.convert.mot.decisions import group_size_at
from sparsify.errors import SparsifyError
from sparsify.upcycle import upcycle

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def mot_models(dense_models, tmp_path_factory):
    """family -> MoT folder: every layer, 4 experts of 24 neurons, G = 2 (the tiny models have 2 layers)."""
    folder = tmp_path_factory.mktemp("mot")
    return {family: upcycle(str(path), "mot", folder / family, experts=4, group_size=2, layers="all").output
            for family, path in dense_models.items() if family in FAMILIES}


def _teacher_logits(folder, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(ids, **kwargs).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("copies", [1, 3])
def test_group_size_one_reproduces_the_teacher_without_sparsify_installed(family, copies, dense_models, tmp_path):
    output = upcycle(str(dense_models[family]), "mot", tmp_path / "mot", experts=6, copies=copies, group_size=1, layers="all").output
    done, result = forward_without_sparsify(output, IDS, tmp_path)
    assert done.returncode == 0, done.stderr
    assert result["type"] == "MoTForCausalLM"
    torch.testing.assert_close(result["logits"], _teacher_logits(dense_models[family], IDS), rtol=0, atol=1e-5)
    record = json.loads((output / "sparsify.json").read_text())
    assert record["variant"] == "mot" and record["layout"]["dense_path"] == {"group_size": 1}


def test_registered_with_the_auto_classes_and_the_group_size_is_adjustable(mot_models, dense_models):
    model = AutoModelForCausalLM.from_pretrained(mot_models["qwen2"]).eval()  # no trust_remote_code
    assert type(model).__module__.startswith("sparsify.convert.mot")
    assert model.model.layers[0].mlp.controller.weight.dtype == torch.float32
    teacher = _teacher_logits(dense_models["qwen2"], IDS)
    with torch.no_grad():
        mixed = model(IDS).logits
        model.set_group_size(1)
        torch.testing.assert_close(model(IDS).logits, teacher, rtol=0, atol=1e-5)
    assert (mixed - teacher).abs().max() > 1e-2  # at G = 2 the two sequences really mix


def test_a_batch_of_one_is_the_dense_model_at_any_group_size(mot_models, dense_models):
    """Alone in its group (the other rows dummy, masked), a token takes all of every expert's weight."""
    model = AutoModelForCausalLM.from_pretrained(mot_models["llama"]).eval()
    model.set_group_size(4)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS[:1]).logits, _teacher_logits(dense_models["llama"], IDS[:1]), rtol=0, atol=1e-5)


def test_tokens_mix_only_with_other_sequences_at_the_same_position(mot_models):
    model = AutoModelForCausalLM.from_pretrained(mot_models["mistral"]).eval()
    changed = IDS.clone()
    changed[1, 8] = 4321  # the second sequence changes at position 8
    with torch.no_grad():
        before, after = model(IDS).logits, model(changed).logits
    torch.testing.assert_close(after[0, :8], before[0, :8], rtol=0, atol=1e-6)  # causal: earlier positions of its partner untouched
    assert (after[0, 8:] - before[0, 8:]).abs().max() > 1e-3  # the partner at position 8 and later feels it


def test_padding_and_dummy_rows_take_no_mixture_weight(mot_models, dense_models):
    model = AutoModelForCausalLM.from_pretrained(mot_models["qwen3"]).eval()
    model.set_group_size(4)
    ids = torch.cat([IDS, IDS[:1].flip(1)])  # three sequences: one dummy row completes the group
    padded_ids = torch.cat([ids, IDS[1:]])  # a fourth sequence, all padding
    mask = torch.ones_like(padded_ids)
    mask[3] = 0
    with torch.no_grad():
        three = model(ids).logits
        four = model(padded_ids, attention_mask=mask).logits
    torch.testing.assert_close(four[:3], three, rtol=0, atol=1e-5)
    # Left padding: where the partner is padding, the first sequence is alone in its group, i.e. dense.
    left = torch.ones_like(IDS)
    left[1, :5] = 0
    with torch.no_grad():
        partnered = model(IDS, attention_mask=left).logits
    torch.testing.assert_close(partnered[0, :5], _teacher_logits(dense_models["qwen3"], IDS[:1])[0, :5], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cached_decoding_equals_recomputation_for_a_fixed_batch(family, mot_models):
    model = AutoModelForCausalLM.from_pretrained(mot_models[family]).eval()
    prompt = torch.cat([IDS[:, :6], IDS[:, 3:9]])  # four sequences: two groups
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0,
                                attention_mask=torch.ones_like(prompt))
        ids = prompt
        for _ in range(8):  # the whole batch recomputed at every step, no cache
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached.tolist() == ids.tolist()


def test_gradients_reach_the_controllers_only_when_tokens_mix(mot_models):
    model = AutoModelForCausalLM.from_pretrained(mot_models["llama"])
    for size, expect in ((1, False), (2, True)):
        model.zero_grad(set_to_none=True)
        model.set_group_size(size)
        model(IDS).logits.float().pow(2).mean().backward()
        grad = model.model.layers[1].mlp.controller.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == expect, size


def test_the_group_size_grows_by_doubling_over_the_first_fraction():
    sizes = [group_size_at(step, 100, (1, 8), 0.5) for step in range(1, 101)]
    assert sizes[0] == 2 and sizes[-1] == 8 and sorted(sizes) == sizes
    assert [sizes.count(g) for g in (1, 2, 4, 8)] == [0, 25, 25, 50]  # G = 1 (the teacher itself) gets no steps
    assert [group_size_at(step, 100, (2, 8), 0.5) for step in range(1, 101)] == sizes
    assert group_size_at(1, 10, (4, 4), 0.5) == 4 and group_size_at(1, 10, (1, 1), 0.5) == 1
    assert {group_size_at(step, 10, (1, 2), 0.5) for step in range(1, 11)} == {2}


def test_training_grows_the_group_size_from_the_exact_model_and_learns(mot_models, dense_models, corpus, tmp_path):
    from sparsify.train.loop import train

    model = upcycle(str(dense_models["llama"]), "mot", tmp_path / "mot", experts=4, group_size=4, layers="all").output
    result = train(model, tiny_options(corpus, tokens="1024", grow_group_size="1:4", train_experts="full", expert_lr=1e-3),
                   output=tmp_path / "trained")
    sizes = [entry["group_size"] for entry in result.history]
    assert sizes == [2, 2, 2, 2, 4, 4, 4, 4]  # 8 steps, END from step 5 (--grow-fraction 0.5); no steps at G = 1
    assert result.history[0]["kl"] > 0.01  # tokens mix from the first step
    assert result.after["kl"] < result.before["kl"]  # held out, at G = 4
    done, loaded = forward_without_sparsify(result.output, IDS, tmp_path)
    assert done.returncode == 0, done.stderr
    assert loaded["type"] == "MoTForCausalLM"


def test_a_growth_that_does_not_end_at_the_models_group_size_is_refused(mot_models, corpus, tmp_path):
    from sparsify.train.loop import train

    with pytest.raises(SparsifyError, match=r"--grow-group-size 1:8 ends at 8, but the model's group size is 2"):
        train(mot_models["llama"], tiny_options(corpus, tokens="512", grow_group_size="1:8"), output=tmp_path / "out")


@pytest.mark.parametrize("options,match", [
    (dict(experts=5), r"--experts 5 does not divide the FFN's 96 neurons"),
    (dict(experts=4, copies=3), r"--experts 4 must be a multiple of --copies 3"),
    (dict(layers="1-7"), r"--layers 1-7 names layers outside 0-1"),
    (dict(layers="late"), r"--layers takes later-half, all or indices"),
    (dict(group_size=0), r"group.size"),
    (dict(controller_init="data"), r"--controller-init data measures the dense model on text: pass --calibration-data"),
    (dict(split="coactivation"), r"--split coactivation measures the dense model on text"),
    (dict(controller_init="random"), r"--controller-init must be one of weights, data"),
])
def test_bad_mot_options_are_refused_before_writing(options, match, dense_models, tmp_path):
    with pytest.raises(SparsifyError, match=match):
        upcycle(str(dense_models["llama"]), "mot", tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_data_driven_start_is_exact_at_group_size_one_and_its_controller_ranks_tokens(family, dense_models, corpus, tmp_path):
    """Coactivation clusters reorder the neurons (any order sums to the FFN); the fitted controller
    gives each expert, of two calibration tokens, to the one it adds more to, better than chance."""
    output = upcycle(str(dense_models[family]), "mot", tmp_path / "mot", experts=4, group_size=1, layers="all",
                     calibration_data=str(corpus["train"]), calibration_tokens="2k", calibration_seq_len=64).output
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(output).eval()(IDS).logits
    torch.testing.assert_close(logits, _teacher_logits(dense_models[family], IDS), rtol=0, atol=1e-5)
    layout = json.loads((output / "sparsify.json").read_text())["layout"]
    assert (layout["controller_init"], layout["split"]) == ("data", "coactivation")
    assert layout["calibration"]["tokens"] == 2000 and set(layout["calibration"]["layers"]) == {"0", "1"}
    for figures in layout["calibration"]["layers"].values():
        assert figures["pair_agreement"] > 0.6 and figures["spearman"] > 0.3


def test_the_fitted_controller_recovers_a_linear_ranking():
    """When the shares are a linear score plus noise, the fit ranks tokens, per expert, like the shares."""
    from sparsify.convert.mot.calibrate import fit_controller

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=generator)
    truth = torch.randn(16, 3, generator=generator)
    norms = x @ truth + 0.1 * torch.randn(4096, 3, generator=generator)
    controller = fit_controller(x, norms)
    logits = x @ controller
    assert torch.allclose(logits.std(dim=0), torch.ones(3), atol=1e-4)
    agreement = ((logits[:2048] > logits[2048:]) == (norms[:2048] > norms[2048:])).float().mean()
    assert agreement > 0.95


def test_an_moe_source_is_refused(dense_models, tmp_path):
    moe = upcycle(str(dense_models["llama"]), "moe", tmp_path / "moe", experts=2, top_k=1).output
    with pytest.raises(SparsifyError, match="--to mot supports model types llama, mistral, qwen2, qwen3"):
        upcycle(str(moe), "mot", tmp_path / "out")


def test_eval_reports_how_the_experts_mix_the_flops_and_the_quality_at_other_group_sizes(mot_models, dense_models, corpus, tmp_path):
    from sparsify.eval.options import EvalOptions
    from sparsify.eval.run import evaluate

    options = EvalOptions(data=str(corpus["valid"]), suite="quality,cost,routing", tokens="256", window=32, stride=16, batch_size=4,
                          routing_tokens="256", speed_batch="1", prompt_len=8, decode_tokens=2, repeats=1, warmup=0)
    report = evaluate(str(mot_models["llama"]), options, output=tmp_path / "report")
    mixing = report["routing"]["mot"]
    assert mixing["group_size"] == 2 and mixing["groups"] > 0 and len(mixing["layers"]) == 2
    assert 1.0 <= mixing["effective_tokens"] <= 2.0 and 0 < mixing["mixture_entropy"] <= mixing["max_entropy"] + 1e-6
    flops = report["cost"]["model"]["flops_per_token"]
    assert flops["total_mot"] < flops["total"]  # each expert runs once per group of two
    assert (tmp_path / "report" / "mot_mixing.png").exists()
    sensitivity = report["quality"]["settings"]
    assert set(sensitivity) == {"group size 1", "group size 4"}  # G = 2: the dense path and twice G
    # At G = 1 the model is its teacher exactly; without a teacher in the report, the source folder's own perplexity.
    teacher = evaluate(str(dense_models["llama"]), EvalOptions(data=str(corpus["valid"]), suite="quality", tokens="256", window=32,
                                                                stride=16, batch_size=4))
    assert sensitivity["group size 1"]["model"]["perplexity"] == pytest.approx(teacher["quality"]["model"]["perplexity"], rel=1e-5)
    assert sensitivity["group size 4"]["model"]["perplexity"] != pytest.approx(report["quality"]["model"]["perplexity"], rel=1e-3)
