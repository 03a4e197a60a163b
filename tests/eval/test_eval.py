"""sparsify eval: quality against hand computation, routing bookkeeping, speed, tasks, report, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from support import sparsify_command
from sparsify.data import iter_documents
from sparsify.errors import SparsifyError
from sparsify.eval.cost import flops_per_token, measure_speed, parameter_counts
from sparsify.eval.probes import probes_for
from sparsify.eval.quality import measure_quality
from sparsify.eval.report import SCHEMA_VERSION, load_report
from sparsify.eval.routing import measure_routing
from sparsify.eval.tasks import run_tasks
from sparsify.eval.text import build_eval_text, windows


@pytest.fixture(scope="module")
def dense(dense_models):
    return AutoModelForCausalLM.from_pretrained(dense_models["llama"]).eval(), AutoTokenizer.from_pretrained(dense_models["llama"])


@pytest.fixture(scope="module")
def text(dense, corpus):
    return build_eval_text(iter_documents(str(corpus["valid"])), dense[1], max_tokens=700)


def _nll_of_positions(model, ids, positions, begin=0):
    with torch.no_grad():
        log_probs = F.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
    return sum(-log_probs[p - 1 - begin, ids[p - begin]].item() for p in positions)


def test_perplexity_equals_a_hand_computed_value(dense, text):
    model, _ = dense
    targets = [p for p in range(len(text.ids)) if text.is_target[p]]
    # One window over everything: every text token scored with its full left context.
    whole = measure_quality(model, text, window=len(text.ids), stride=1, batch_size=1)
    by_hand = _nll_of_positions(model, text.ids, targets)
    assert whole["tokens"] == len(targets) == text.num_targets
    assert whole["model"]["perplexity"] == pytest.approx(math.exp(by_hand / len(targets)), rel=1e-5)
    # Windows of 128 moved by 100: positions 1-127 are scored in the first window, then each
    # later window scores only its last 28 (new) positions, with 100 tokens of context.
    sliding = measure_quality(model, text, window=128, stride=100, batch_size=3)
    nll, begin, scored_until = 0.0, 0, 1
    while scored_until < len(text.ids):
        chunk = text.ids[begin:begin + 128]
        new = [p for p in range(scored_until, begin + len(chunk)) if text.is_target[p]]
        nll += _nll_of_positions(model, chunk, new, begin=begin)
        scored_until, begin = begin + len(chunk), begin + 100
    assert sliding["tokens"] == len(targets)
    assert sliding["model"]["perplexity"] == pytest.approx(math.exp(nll / len(targets)), rel=1e-5)


def test_sliding_windows_score_every_position_once_with_enough_context():
    spans = windows(1000, window=256, stride=100)
    scored = [p for _, end, first in spans for p in range(first, end)]
    assert scored == list(range(1, 1000))
    assert all(first - begin >= 256 - 100 for begin, _, first in spans[1:])
    for stride in (0, 4, 5):
        with pytest.raises(SparsifyError):
            windows(10, window=4, stride=stride)


def test_bits_per_byte_agrees_with_perplexity_given_the_byte_count(dense, text, corpus):
    result = measure_quality(dense[0], text, window=256, stride=128, batch_size=2)
    documents = list(iter_documents(str(corpus["valid"])))
    assert text.num_bytes <= sum(len(d.encode()) for d in documents[: text.num_documents])
    expected = math.log2(result["model"]["perplexity"]) * result["tokens"] / text.num_bytes
    assert result["model"]["bits_per_byte"] == pytest.approx(expected, rel=1e-9)


def test_kl_is_zero_for_the_model_against_itself(dense, text):
    result = measure_quality(dense[0], text, window=256, stride=128, batch_size=2, teacher=dense[0])
    assert abs(result["vs_teacher"]["kl"]) < 1e-6 and result["vs_teacher"]["top1_agreement"] == 1.0
    assert result["teacher"]["perplexity"] == pytest.approx(result["model"]["perplexity"], rel=1e-9)


def test_routing_loads_sum_to_tokens_times_top_k_and_hooks_change_nothing(students, text):
    model = AutoModelForCausalLM.from_pretrained(students["half"]).eval()
    ids = text.ids[:128][None]
    with torch.no_grad():
        plain = model(ids).logits
        probes = probes_for(model)
        for probe in probes:
            probe.attach()
        watched = model(ids).logits
        for probe in probes:
            probe.detach()
    assert torch.equal(plain, watched)
    routing = measure_routing(model, text, block=64, batch_size=4, max_tokens=600)
    moe = routing["moe"]
    # Every token asked for is watched: 9 whole blocks of 64 plus the remaining 24 as a shorter one.
    assert moe["tokens"] == 600 and moe["top_k"] == 2 and moe["num_experts"] == 4
    for layer in moe["layers"]:
        assert sum(layer["load"]) == moe["tokens"] * moe["top_k"]
        assert 1.0 <= layer["imbalance"] <= moe["num_experts"] / moe["top_k"]
        assert 0.0 < layer["entropy_normalised"] <= 1.0 + 1e-6
    dense_model = AutoModelForCausalLM.from_pretrained(json.loads((students["half"] / "sparsify.json").read_text())["source"]["path"])
    assert measure_routing(dense_model, text, block=64, batch_size=4, max_tokens=600) is None


def test_active_parameters_and_flops_follow_the_config(students, dense):
    model, config = dense[0], dense[0].config
    params = parameter_counts(model)
    assert params["total"] == params["active"] == sum(p.numel() for p in model.parameters())  # tied head counted once
    flops = flops_per_token(model, params, context=100)
    per_layer = 2 * (config.hidden_size * (config.hidden_size + 2 * 2 * 16 + config.hidden_size) + 3 * config.hidden_size * config.intermediate_size)
    assert flops["weights"] == config.num_hidden_layers * per_layer + 2 * config.vocab_size * config.hidden_size
    assert flops["attention"] == 4 * config.num_hidden_layers * config.hidden_size * 101 / 2
    half = AutoModelForCausalLM.from_pretrained(students["half"])
    moe_params = parameter_counts(half)
    ffn = config.num_hidden_layers * 3 * config.hidden_size * config.intermediate_size
    routers = config.num_hidden_layers * 4 * config.hidden_size
    assert moe_params["total"] == params["total"] + routers and moe_params["experts"] == ffn
    assert moe_params["active"] == params["total"] - ffn // 2 + routers  # top-2 of 4 experts of d_ff/4: half the FFN


def test_speed_suite_returns_sane_positive_numbers_on_cpu(students, text):
    model = AutoModelForCausalLM.from_pretrained(students["half"]).eval()
    speed = measure_speed(model, text.ids[1:], batch_sizes=[1, 2], prompt_len=16, decode_tokens=4, warmup=1, repeats=3, pad_token_id=0)
    for entry in speed.values():
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_step"):
            stats = entry[key]
            assert 0 < stats["min"] <= stats["median"] <= stats["max"] < 1e9 and stats["repeats"] == 3


def test_the_harness_runs_the_shipped_offline_task_end_to_end(dense):
    model, tokenizer = dense
    results = run_tasks(model, tokenizer, ["sparsify_tiny"], task_paths=[], batch_size=8, limit=None, num_fewshot=None)
    assert set(results) == {"sparsify_tiny"}
    assert 0.0 <= results["sparsify_tiny"]["acc"] <= 1.0 and "acc_stderr" in results["sparsify_tiny"]
    with pytest.raises(SparsifyError, match="not found.*sparsify_tiny"):
        run_tasks(model, tokenizer, ["no_such_task"], task_paths=[], batch_size=8, limit=None, num_fewshot=None)


def _sparsify(*args):
    return subprocess.run([*sparsify_command(), *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})


def test_eval_cli_writes_a_report_compares_and_fills_the_card(students, dense_models, corpus, tmp_path):
    common = ["--data", str(corpus["valid"]), "--tokens", "1k", "--window", "128", "--stride", "64", "--speed-batch", "1",
              "--prompt-len", "16", "--decode-tokens", "4", "--repeats", "2"]
    done = _sparsify("eval", str(students["half"]), "--teacher", str(dense_models["llama"]), *common, "-o", str(tmp_path / "a"), "--card")
    assert done.returncode == 0, done.stderr
    assert "perplexity" in done.stdout and "model vs teacher" in done.stdout
    report = load_report(tmp_path / "a")
    assert report["schema_version"] == SCHEMA_VERSION and report["model"]["variant"] == "fine-moe"
    assert {"quality", "cost", "routing"} <= set(report) and (tmp_path / "a" / "routing_load.png").stat().st_size > 1000
    markdown = (tmp_path / "a" / "report.md").read_text()
    assert "| perplexity |" in markdown and "routing_load.png" in markdown
    card = (students["half"] / "README.md").read_text()
    assert card.count("<!-- sparsify-eval:begin -->") == 1 and "| perplexity |" in card
    again = _sparsify("eval", str(dense_models["llama"]), *common, "--suite", "quality", "-o", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    compared = _sparsify("compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert compared.returncode == 0, compared.stderr
    assert "perplexity" in compared.stdout and students["half"].name in compared.stdout


def test_bad_inputs_get_one_clear_line(tmp_path, corpus):
    (tmp_path / "empty").mkdir()
    for args, message in [
        (["eval", str(tmp_path / "empty"), "--data", str(corpus["valid"])], "not a Hugging Face model folder"),
        (["eval", "smollm2-135m", "--suite", "quality"], "need held-out text: pass --data"),
        (["eval", "smollm2-135m", "--suite", "speed"], "unknown --suite speed"),
        (["compare", str(tmp_path / "empty")], "has no report.json"),
    ]:
        done = _sparsify(*args)
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text(json.dumps({"schema": "sparsify-eval-report", "schema_version": 0}))
    done = _sparsify("compare", str(old))
    assert done.returncode == 1 and "re-run `sparsify eval`" in done.stderr and "Traceback" not in done.stderr
