"""Layer skip: exact when open, a closed gate removes exactly its sublayer, cached decode equals
recomputation, the folder loads with and without sparsify, gradients reach the gates."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import IDS, forward_without_sparsify, randomise_gates, record_gate_decisions

from sparsify.errors import SparsifyError
from sparsify.upcycle import upcycle



@pytest.fixture(scope="module")
def skip_models(dense_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("skip")
    return {family: upcycle(str(path), "skip", folder / family).output for family, path in dense_models.items()}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_open_gates_reproduce_the_teacher_without_sparsify_installed(family, skip_models, dense_models, tmp_path):
    done, loaded = forward_without_sparsify(skip_models[family], IDS, tmp_path)
    assert done.returncode == 0, done.stderr
    result = loaded
    teacher = AutoModelForCausalLM.from_pretrained(dense_models[family]).eval()
    with torch.no_grad():
        expected = teacher(IDS).logits
    assert result["type"] == "SkipForCausalLM"
    torch.testing.assert_close(result["logits"], expected, rtol=0, atol=1e-5)


def test_registered_with_the_auto_classes_when_sparsify_is_imported(skip_models, dense_models):
    model = AutoModelForCausalLM.from_pretrained(skip_models["qwen2"]).eval()  # no trust_remote_code
    assert type(model).__module__.startswith("sparsify.convert.skip")
    teacher = AutoModelForCausalLM.from_pretrained(dense_models["qwen2"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, teacher(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sublayer,module", [("ffn", "mlp"), ("attention", "self_attn")])
def test_a_closed_gate_removes_exactly_its_sublayer(sublayer, module, skip_models, dense_models):
    model = AutoModelForCausalLM.from_pretrained(skip_models["llama"]).eval()
    model.gates[sublayer][1].forced = False
    teacher = AutoModelForCausalLM.from_pretrained(dense_models["llama"]).eval()
    removed = getattr(teacher.model.layers[1], module)
    original = removed.forward
    removed.forward = lambda *args, **kwargs: (
        torch.zeros_like(kwargs.get("hidden_states", args[0] if args else None)) if module == "mlp"
        else (torch.zeros_like(kwargs["hidden_states"]), None)
    )
    with torch.no_grad():
        expected = teacher(IDS).logits
        removed.forward = original
        full = teacher(IDS).logits
        skipped = model(IDS).logits
    torch.testing.assert_close(skipped, expected, rtol=0, atol=1e-5)
    assert (skipped - full).abs().max() > 1e-2  # the sublayer mattered


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cached_greedy_decoding_equals_recomputation(family, skip_models):
    model = AutoModelForCausalLM.from_pretrained(skip_models[family]).eval()
    randomise_gates(model, seed=1)
    decisions, hooks = record_gate_decisions(model)
    prompt = IDS[:1, :6]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)[0]
        ids = prompt
        for _ in range(12):  # recompute the whole sequence at every step, no cache
            next_token = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    for hook in hooks:
        hook.remove()
    kept = torch.cat([d.reshape(-1) for d in decisions])
    assert 0.2 < kept.float().mean() < 0.8  # the gates really skip, in both directions
    assert cached.tolist() == ids[0].tolist()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_batched_inference_gathers_kept_tokens_and_matches_the_masked_computation(family, skip_models):
    model = AutoModelForCausalLM.from_pretrained(skip_models[family]).eval()
    randomise_gates(model, seed=2)
    padding = torch.ones_like(IDS)
    padding[1, :4] = 0  # left padding in the second row: the padding mask must reach the gathered queries
    for mask in (None, padding):
        with torch.no_grad():
            gathered = model(IDS, attention_mask=mask).logits  # inference: kept tokens' queries and FFN rows only
        with torch.enable_grad():
            masked = model(IDS, attention_mask=mask).logits  # differentiable: all computed, skipped outputs zeroed
        torch.testing.assert_close(gathered[padding.bool()], masked.detach()[padding.bool()], rtol=0, atol=1e-5)


def test_straight_through_gates_get_gradients_and_keep_hard_decisions(skip_models):
    model = AutoModelForCausalLM.from_pretrained(skip_models["llama"])
    randomise_gates(model, seed=3)
    model.train()
    logits = model(IDS).logits
    with torch.no_grad():
        model.eval()
        hard = model(IDS).logits
    torch.testing.assert_close(logits.detach(), hard, rtol=0, atol=1e-5)  # the forward value is the hard decision
    logits.float().logsumexp(-1).mean().backward()
    grads = [gate.weight.grad for _, _, gate in model.skip_gates()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_threshold_is_adjustable_after_loading(skip_models):
    model = AutoModelForCausalLM.from_pretrained(skip_models["llama"]).eval()
    model.set_skip_threshold(0.999)  # above sigmoid(6): every gate closes
    with torch.no_grad():
        logits = model(IDS).logits
    only_embeddings = model.lm_head(model.model.norm(model.model.embed_tokens(IDS)))
    torch.testing.assert_close(logits, only_embeddings, rtol=0, atol=1e-5)


def test_frozen_gates_change_nothing_where_the_gate_never_decides_and_survive_saving(skip_models, tmp_path):
    from sparsify.convert.skip.probe import SkipGateProbe
    from sparsify.convert.skip.freezing import FreezeRule, freeze_gates
    from sparsify.convert.skip.decisions import find_gates, gates_open

    model = AutoModelForCausalLM.from_pretrained(skip_models["llama"]).eval()
    randomise_gates(model, seed=2)
    gates = model.skip_gates()
    (on_layer, on_sublayer, always_on), (off_layer, off_sublayer, always_off) = gates[0], gates[1]
    always_on.weight.data.zero_(), always_on.bias.data.fill_(10.0)
    always_off.weight.data.zero_(), always_off.bias.data.fill_(-10.0)
    with torch.no_grad():
        before = model(IDS).logits
    rows = [{"layer": layer, "sublayer": sublayer, "skip_rate": {id(always_on): 0.0, id(always_off): 1.0}.get(id(gate), 0.5)}
            for layer, sublayer, gate in gates]
    probe = SkipGateProbe(gates)

    def watched() -> dict:
        probe.attach()
        with torch.no_grad():
            model(IDS)
        probe.detach()
        return probe.summary()

    unfrozen = watched()
    frozen = freeze_gates(model, rows, FreezeRule(open_below=0.05, closed_above=0.95))
    assert frozen == {f"{on_layer}.{on_sublayer}": True, f"{off_layer}.{off_sublayer}": False}
    assert always_on.forced is True and always_off.forced is False and all(gate.forced is None for _, _, gate in gates[2:])
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=1e-6)
    assert watched() == unfrozen  # frozen gates are still counted, with the decisions they always made
    with gates_open(find_gates(model)):  # the training loop's teacher pass
        assert always_off.forced is True
    assert always_off.forced is False  # frozen again afterwards
    model.save_pretrained(tmp_path / "frozen")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "frozen").eval()
    assert reloaded.config.frozen_gates == frozen
    assert [gate.forced for _, _, gate in reloaded.skip_gates()] == [gate.forced for _, _, gate in gates]
    with pytest.raises(SparsifyError, match="open-below"):
        FreezeRule(open_below=0.5, closed_above=0.2)


def test_bad_skip_options_are_refused_before_writing(dense_models, tmp_path):
    for options, message in [
        ({"gates": "mlp"}, "--gates must be one of"),
        ({"exclude_first": 1, "exclude_last": 1}, "leave no layer to gate"),
        ({"threshold": 1.5}, "--threshold must be between 0 and 1"),
        ({"gate_bias_init": -1.0}, "starts the gates closed"),
    ]:
        with pytest.raises(SparsifyError, match=message):
            upcycle(str(dense_models["llama"]), "skip", tmp_path / "x", **options)
        assert not (tmp_path / "x").exists()


def test_a_tiny_training_run_lowers_the_skip_loss_and_keeps_kl_bounded(skip_models, corpus, tmp_path):
    from sparsify.train.loop import train
    from sparsify.train.options import TrainOptions

    options = TrainOptions.of(
        data=str(corpus["train"]), eval_data=str(corpus["valid"]), tokens="6144", seq_len=32, batch_size=4, eval_every=0,
        eval_tokens="512", checkpoint_every=0, lr=3e-3, router_lr=5e-2, lora_rank=4, lora_alpha=8.0, target_skip=0.3, skip_weight=1.0,
    )
    result = train(skip_models["llama"], options, output=tmp_path / "trained")
    assert result.before["kl"] < 1e-6 and result.before["skip_rate"] == 0.0  # the teacher, exactly, at the start
    first, last = result.history[0], result.history[-1]
    assert last["skip"] < 0.5 * first["skip"]  # measured: 0.30 -> ~0 (the hinge is satisfied)
    assert result.after["skip_rate"] > 0.15 and result.after["kl"] < 0.5  # measured: ~37% skipped, KL ~0.1
    done, loaded = forward_without_sparsify(result.output, IDS, tmp_path)
    assert done.returncode == 0, done.stderr  # the trained folder still carries its modeling code
    record = json.loads((result.output / "sparsify.json").read_text())
    assert record["variant"] == "skip" and record["layout"]["dense_path"] is None


def test_training_keeps_frozen_gates_frozen_and_counts_them(skip_models, corpus, tmp_path):
    from sparsify.train.loop import train
    from sparsify.train.options import TrainOptions

    model = AutoModelForCausalLM.from_pretrained(skip_models["qwen2"])
    gates = model.skip_gates()
    decisions = {f"{layer}.{sublayer}": index % 2 == 0 for index, (layer, sublayer, _) in enumerate(gates[:-1])}
    model.freeze_gates(decisions)  # every gate but the last frozen, half of them closed
    source = tmp_path / "frozen"
    shutil.copytree(skip_models["qwen2"], source)
    model.save_pretrained(source)
    options = TrainOptions.of(data=str(corpus["train"]), eval_data=str(corpus["valid"]), tokens="1024", seq_len=32, batch_size=4,
                           eval_every=0, eval_tokens="256", checkpoint_every=0, lora_rank=4, lora_alpha=8.0, target_skip=0.3)
    result = train(source, options, output=tmp_path / "trained")
    closed = sum(not keep for keep in decisions.values()) / len(gates)
    assert result.before["skip_rate"] >= closed - 1e-6  # the frozen-closed gates are counted as skipping
    trained = AutoModelForCausalLM.from_pretrained(result.output)
    assert trained.config.frozen_gates == decisions
    assert [gate.forced for _, _, gate in trained.skip_gates()] == [*decisions.values(), None]


def test_skip_sweep_reports_quality_skip_rate_and_speed_per_threshold(skip_models, dense_models, corpus, tmp_path):
    from sparsify.eval.options import EvalOptions
    from sparsify.convert.skip.sweep import skip_sweep
    from sparsify.convert.skip.freezing import FreezeRule

    settings = EvalOptions(teacher=str(dense_models["llama"]), data=str(corpus["valid"]), tokens="1k", batch_size=2,
                           routing_tokens="512", speed_batch="1", prompt_len=8, decode_tokens=3, repeats=1, warmup=0)
    # Fresh gates sit at sigmoid(6) = 0.9975: every token runs below that threshold and skips above it.
    result = skip_sweep(str(skip_models["llama"]), [0.5, 0.999], [64, 128], settings, output=tmp_path)
    open_, closed = result["thresholds"]
    for window in ("64", "128"):
        assert open_["quality"][window]["skip_rate"] == 0.0 and open_["quality"][window]["perplexity_ratio"] == pytest.approx(1.0, rel=1e-5)
        assert closed["quality"][window]["skip_rate"] == 1.0 and closed["quality"][window]["kl"] > 0.01
    # One timed repeat cannot show its spread: no speed-up is claimed, and the reason is recorded.
    assert open_["speedup"] == {"batch_1_prefill": None, "batch_1_decode": None}
    assert "model too few repeats: 1" in open_["speedup_problems"]["batch_1_prefill"]
    assert (tmp_path / "sweep.json").exists() and (tmp_path / "sweep.png").stat().st_size > 1000
    # Frozen: fresh gates keep every token at 0.5 and skip every token at 0.999, so none is left deciding.
    frozen = skip_sweep(str(skip_models["llama"]), [0.5, 0.999], [64], settings, freeze=FreezeRule(0.01, 0.99),
                        calibration_data=str(corpus["train"]))
    gates = len(AutoModelForCausalLM.from_pretrained(skip_models["llama"]).skip_gates())
    assert [e["frozen_gates"] for e in frozen["thresholds"]] == [{"always_run": gates, "always_skip": 0, "per_token": 0},
                                                                 {"always_run": 0, "always_skip": gates, "per_token": 0}]
    for got, want in zip(frozen["thresholds"], result["thresholds"], strict=True):
        assert got["quality"]["64"]["perplexity"] == pytest.approx(want["quality"]["64"]["perplexity"], rel=1e-5)


def test_skip_freeze_writes_a_folder_that_serves_its_threshold_and_frozen_gates(skip_models, corpus, tmp_path):
    import os

    from support import sparsify_command

    source = tmp_path / "trained"  # stands in for a trained model: gates that really decide, one that always skips
    shutil.copytree(skip_models["llama"], source)
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    randomise_gates(model, seed=8)
    layer, sublayer, always_off = model.skip_gates()[2]
    always_off.weight.data.zero_(), always_off.bias.data.fill_(-10.0)
    model.save_pretrained(source)
    current = (source / "modeling_skip.py").read_bytes()
    (source / "modeling_skip.py").write_bytes(b"# an older sparsify's copy\n" + current)
    output = tmp_path / "served"
    done = subprocess.run([*sparsify_command(), "skip-freeze", str(source), "-o", str(output), "--data", str(corpus["train"]),
                           "--threshold", "0.4", "--freeze-below", "0.2", "--freeze-above", "0.95", "--tokens", "2k"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "always run" in done.stdout and "per token" in done.stdout
    assert (output / "modeling_skip.py").read_bytes() == current  # the code that knows frozen_gates, not the source's copy
    config = json.loads((output / "config.json").read_text())
    frozen = config["frozen_gates"]
    assert config["skip_threshold"] == 0.4 and frozen[f"{layer}.{sublayer}"] is False
    assert 0 < len(frozen) < len(model.skip_gates())  # some gates frozen, others still decide per token
    record = json.loads((output / "sparsify.json").read_text())
    assert record["serving"]["frozen"]["per_token"] == len(model.skip_gates()) - len(frozen)
    info = subprocess.run([*sparsify_command(), "info", str(output)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert info.returncode == 0 and "decide per token" in info.stdout and "0.4" in info.stdout, info.stderr
    served = AutoModelForCausalLM.from_pretrained(output).eval()
    assert served.config.frozen_gates == frozen
    assert served.gates["attention"][0].weight.dtype == torch.float32
    done, loaded = forward_without_sparsify(output, IDS, tmp_path)
    assert done.returncode == 0, done.stderr  # remote code honours the frozen gates too
    with torch.no_grad():
        torch.testing.assert_close(loaded["logits"], served(IDS).logits, rtol=0, atol=1e-5)
    refused = subprocess.run([*sparsify_command(), "skip-freeze", str(output), "-o", str(output), "--data", str(corpus["train"])],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "already exists" in refused.stderr
