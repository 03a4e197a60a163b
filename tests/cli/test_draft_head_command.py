"""`sparsify draft-head` over the installed command: the copy carries a trained head beside the model's
files (byte for byte), `generate --speculative` drafts with it and prints the teacher's text, the table
reports the head's scores; a killed run resumes; bad input gets one line and writes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from support import sparsify_command

from sparsify.convert.skip.draft_head_copy import run_folder

from test_generate import PROMPTS, _continuations, run_cli, skip_folder  # noqa: F401 - a fixture

TRAIN = ("--steps", "6", "--batch-size", "2", "--window-len", "24", "--score-windows", "2", "--device", "cpu")


def test_draft_head_writes_a_copy_that_generate_drafts_with(dense_models, corpus, tmp_path):
    source = dense_models["llama"]
    out = tmp_path / "with-head"
    done = run_cli("draft-head", str(source), "-o", str(out), "--data", str(corpus["train"]), *TRAIN)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    config = json.loads((out / "draft_head" / "config.json").read_text())
    assert config["init_from_layer"] == 1 and config["training"]["steps"] == 6 and config["training"]["tokens_seen"] == 6 * 2 * 24
    assert "after training" in done.stdout and "accepted drafts per round" in done.stdout
    assert not run_folder(out).exists()  # the checkpoints go once the copy is written
    teacher = run_cli("generate", str(source), "-p", PROMPTS[0], "--max-new-tokens", "10", "--device", "cpu")
    drafted = run_cli("generate", str(out), "-p", PROMPTS[0], "--max-new-tokens", "10", "--device", "cpu", "--speculative",
                      "--draft-tokens", "3")
    assert drafted.returncode == 0, drafted.stderr
    assert _continuations(drafted.stdout) == _continuations(teacher.stdout)
    assert "draft head (1 layer, from layer 1, trained on 288 tokens)" in drafted.stderr
    gates = run_cli("generate", str(out), "-p", PROMPTS[0], "--device", "cpu", "--speculative", "--draft", "gates")
    assert gates.returncode != 0 and "drafts with a skip model's gates" in gates.stderr
    sampled = run_cli("generate", str(out), "-p", PROMPTS[0], "--device", "cpu", "--speculative", "--do-sample")
    assert sampled.returncode != 0 and "greedily" in sampled.stderr and "Traceback" not in sampled.stderr
    again = run_cli("draft-head", str(out), "-o", str(tmp_path / "twice"), "--data", str(corpus["train"]), *TRAIN)
    assert again.returncode != 0 and "already carries a draft head" in again.stderr


def test_a_killed_draft_head_run_resumes(dense_models, corpus, tmp_path):
    out = tmp_path / "resumed"
    args = ("draft-head", str(dense_models["llama"]), "-o", str(out), "--data", str(corpus["train"]), "--steps", "60",
            "--checkpoint-every", "10", "--batch-size", "2", "--window-len", "24", "--score-windows", "2", "--device", "cpu")
    process = subprocess.Popen([*sparsify_command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    checkpoint = run_folder(out) / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not out.exists()
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert "resumed from step" in done.stdout and (out / "draft_head" / "model.safetensors").exists()


def test_bad_draft_head_input_gets_one_line(dense_models, corpus, tmp_path):
    source = str(dense_models["llama"])
    for args, message in ((["-o", str(tmp_path / "a"), "--depth", "0"], "--depth"),
                          (["-o", str(tmp_path / "b"), "--window-len", "4"], "--window-len must be at least 8"),
                          (["-o", str(dense_models["llama"] / "inside")], "inside the model folder"),
                          (["-o", str(tmp_path / "c"), "--device", "gpu"], "--device must be auto, cpu, cuda"),
                          (["-o", str(tmp_path / "e"), "--feature-layers", "low"], "--feature-layers takes layer numbers"),
                          (["-o", str(tmp_path / "f"), "--feature-layers", "0,9"], "--feature-layers must name layers 0..1"),
                          (["-o", str(tmp_path / "g"), "--fit-on", "web"], "--fit-on must be one of corpus, teacher"),
                          (["-o", str(tmp_path / "h"), "--feature-weight", "-1"], "--feature-weight must be 0 or more")):
        refused = run_cli("draft-head", source, "--data", str(corpus["train"]), *args)
        assert refused.returncode != 0 and message in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    gguf = run_cli("draft-head", "smollm2-135m", "-o", str(tmp_path / "d"), "--data", str(corpus["train"]))
    assert gguf.returncode != 0 and "not one" in gguf.stderr
    assert not any((tmp_path / name).exists() for name in "abcdefgh")


def test_a_skip_model_with_a_head_drafts_with_its_gates_where_the_head_cannot(skip_folder, dense_models, corpus, tmp_path):  # noqa: F811
    """--draft auto: the head for greedy prompts of one length; sampling (which the head's engine does
    not do) falls back to the gates, with a note; --draft head refuses it in one line."""
    out = tmp_path / "skip-with-head"
    done = run_cli("draft-head", str(skip_folder), "-o", str(out), "--data", str(corpus["train"]), "--feature-layers", "0,1", *TRAIN)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "sparsify.json").read_text())["draft_head"]["steps"] == 6  # recorded with the variant
    teacher = run_cli("generate", str(dense_models["llama"]), "-p", PROMPTS[1], "--max-new-tokens", "8", "--device", "cpu")
    greedy = run_cli("generate", str(out), "-p", PROMPTS[1], "--max-new-tokens", "8", "--device", "cpu", "--speculative")
    assert greedy.returncode == 0 and "reads layers 0,1" in greedy.stderr and _continuations(greedy.stdout) == _continuations(teacher.stdout)
    sampled = run_cli("generate", str(out), "-p", PROMPTS[1], "--max-new-tokens", "8", "--device", "cpu", "--speculative", "--do-sample")
    assert sampled.returncode == 0 and "drafted with the gates, not the model's draft head" in sampled.stdout, sampled.stdout
    insisted = run_cli("generate", str(out), "-p", PROMPTS[1], "--device", "cpu", "--speculative", "--do-sample", "--draft", "head")
    assert insisted.returncode != 0 and "greedily" in insisted.stderr and "Traceback" not in insisted.stderr
    alone = run_cli("generate", str(out), "-p", PROMPTS[1], "--device", "cpu", "--draft", "head")
    assert alone.returncode != 0 and "add --speculative" in alone.stderr
