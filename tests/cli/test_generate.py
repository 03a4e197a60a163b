"""`sparsify generate` over the installed command: a skip model's speculative output is its dense
teacher's output, text for text; bad input gets one line."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from support import randomise_gates, sparsify_command
from transformers import AutoModelForCausalLM

from sparsify.upcycle import upcycle

PROMPTS = ["def main():", "The kernel scheduler", "x = a[i] + b[/x]"]  # brackets: text, not rich markup


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*sparsify_command(), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})


@pytest.fixture(scope="module")
def skip_folder(dense_models, tmp_path_factory):
    """A skip model of the tokenized tiny llama whose gates skip about half the tokens."""
    folder = tmp_path_factory.mktemp("generate")
    converted = upcycle(str(dense_models["llama"]), "skip", folder / "converted").output
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    randomise_gates(model)
    model.save_pretrained(folder / "skip")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sparsify.json"):
        if (converted / name).exists():
            shutil.copy(converted / name, folder / "skip" / name)
    return folder / "skip"


def _continuations(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.strip()]


def test_speculative_generation_prints_the_teachers_text_and_the_acceptance(skip_folder, dense_models):
    prompts = [arg for text in PROMPTS for arg in ("-p", text)]
    teacher = run_cli("generate", str(dense_models["llama"]), *prompts, "--max-new-tokens", "12", "--device", "cpu")
    assert teacher.returncode == 0, teacher.stderr
    speculative = run_cli("generate", str(skip_folder), *prompts, "--max-new-tokens", "12", "--device", "cpu",
                          "--speculative", "--draft-threshold", "0.6", "--draft-tokens", "3")
    assert speculative.returncode == 0, speculative.stderr
    assert _continuations(speculative.stdout) == _continuations(teacher.stdout)
    assert all(any(line.startswith(p) for line in _continuations(teacher.stdout)) for p in PROMPTS)
    assert "drafts accepted" in speculative.stderr and "tokens per verification" in speculative.stderr


def test_the_graph_engine_drafts_with_the_saved_plan_and_prints_the_teachers_text(skip_folder, dense_models, tmp_path):
    """--engine graph (eager on CPU: the same rounds, uncaptured) with a static draft plan saved in the config."""
    from sparsify.convert.skip.draft_plan import DraftPlan

    model = AutoModelForCausalLM.from_pretrained(skip_folder, dtype=torch.float32)
    DraftPlan(("0.ffn", "1.attention")).save_to(model)
    shutil.copytree(skip_folder, tmp_path / "planned")
    model.save_pretrained(tmp_path / "planned")
    teacher = run_cli("generate", str(dense_models["llama"]), "-p", PROMPTS[1], "--max-new-tokens", "10", "--device", "cpu")
    speculative = run_cli("generate", str(tmp_path / "planned"), "-p", PROMPTS[1], "--max-new-tokens", "10", "--device", "cpu",
                          "--speculative", "--engine", "graph", "--draft-tokens", "2")
    assert speculative.returncode == 0, speculative.stderr
    assert _continuations(speculative.stdout) == _continuations(teacher.stdout)
    assert "graph engine" in speculative.stderr and "2 of 4 sublayers skipped" in speculative.stderr


def test_draft_plan_writes_a_copy_whose_saved_plan_generate_drafts_with(skip_folder, dense_models, corpus, tmp_path):
    """`sparsify draft-plan`: searched on training text, the weights copied byte for byte, the plan in
    config.json; generation with it still prints the teacher's text."""
    import json

    out = tmp_path / "planned"
    done = run_cli("draft-plan", str(skip_folder), "-o", str(out), "--data", str(corpus["train"]), "--share", "0.5",
                   "--windows", "2", "--window-len", "16", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    plan = json.loads((out / "config.json").read_text())["draft_plan"]
    assert len(plan["skip"]) == 2 and plan["chosen_by"]["tune_tokens"] == 32 and not plan["gated"]
    record = json.loads((out / "sparsify.json").read_text())["draft_plan"]
    assert [step["dropped"] for step in record["curve"]] == [0, 1, 2] and record["curve"][0]["agreement"] == 1.0
    assert (out / "model.safetensors").read_bytes() == (skip_folder / "model.safetensors").read_bytes()
    assert "2 of 4 sublayers skipped" in done.stdout
    teacher = run_cli("generate", str(dense_models["llama"]), "-p", PROMPTS[0], "--max-new-tokens", "8", "--device", "cpu")
    speculative = run_cli("generate", str(out), "-p", PROMPTS[0], "--max-new-tokens", "8", "--device", "cpu", "--speculative")
    assert _continuations(speculative.stdout) == _continuations(teacher.stdout)
    again = run_cli("draft-plan", str(skip_folder), "-o", str(out), "--data", str(corpus["train"]), "--device", "cpu")
    assert again.returncode != 0 and "already exists" in again.stderr and "Traceback" not in again.stderr
    # On-policy: each 16-token window a prompt the teacher continues by 4; scored from its last token on: 5 per window.
    on_policy = run_cli("draft-plan", str(skip_folder), "-o", str(out), "--data", str(corpus["train"]), "--share", "0.5",
                        "--windows", "2", "--window-len", "16", "--on-policy", "4", "--device", "cpu", "--overwrite")
    assert on_policy.returncode == 0, on_policy.stderr
    plan = json.loads((out / "config.json").read_text())["draft_plan"]
    assert plan["chosen_by"]["tune_tokens"] == 10 and "teacher's greedy continuations" in plan["chosen_by"]["search"]
    assert json.loads((out / "sparsify.json").read_text())["draft_plan"]["on_policy_tokens"] == 4
    dense = run_cli("draft-plan", str(dense_models["llama"]), "-o", str(tmp_path / "x"), "--data", str(corpus["train"]))
    assert dense.returncode != 0 and "not a layer-skip model" in dense.stderr
    for args, message in ((["-o", str(skip_folder / "inside")], "inside the model folder"),
                          (["-o", str(tmp_path / "y"), "--device", "gpu"], "--device must be auto, cpu, cuda"),
                          (["-o", str(tmp_path / "z"), "--share", "0.1", "--device", "cpu"], "drops no sublayer"),
                          (["-o", str(tmp_path / "w"), "--on-policy", "-1"], "--on-policy is a number of tokens")):
        refused = run_cli("draft-plan", str(skip_folder), "--data", str(corpus["train"]), "--windows", "1", "--window-len", "16", *args)
        assert refused.returncode != 0 and message in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    assert not (skip_folder / "inside").exists() and not (tmp_path / "z").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--speculative", "--engine", "graph", "--do-sample"], "--engine graph decodes greedily"),
    (["--engine", "fast"], "--engine must be one of auto, graph, transformers"),
    (["--speculative", "--engine", "graph"], "drafts with a skip model's gates"),
    (["--speculative"], "drafts with a skip model's gates"),
    (["--draft-threshold", "1.5"], "--draft-threshold must be between 0 and 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
])
def test_bad_generation_input_gets_one_line(dense_models, args, message):
    done = run_cli("generate", str(dense_models["llama"]), "-p", "hi", "--device", "cpu", *args)
    assert done.returncode != 0 and message in done.stderr
    assert "Traceback" not in done.stderr
