"""The real console script: happy paths, and every bad input gives one clear line and leaves nothing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

from support import build_dense, sparsify_command


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([*sparsify_command(), *args], capture_output=True, text=True, env=full_env, timeout=600)


def assert_clean_failure(result: subprocess.CompletedProcess, output: Path, *fragments: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.partial-*"))


def test_upcycle_then_info(dense_models, tmp_path):
    output = tmp_path / "fmoe"
    done = run_cli("upcycle", str(dense_models["llama"]), "--to", "fine-moe", "--granularity", "4", "--experts", "2", "-o", str(output))
    assert done.returncode == 0, done.stderr
    assert "MixtralForCausalLM" in done.stdout and "yes" in done.stdout
    record = json.loads((output / "sparsify.json").read_text())
    assert record["command"].startswith("sparsify upcycle") and record["options"]["granularity"] == 4
    assert record["versions"]["torch"] and record["source"]["kind"] == "folder"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert (output / name).exists(), name
    card = (output / "README.md").read_text()
    assert card.startswith("---\n") and "sparsify" in card and "fine-grained-moe" in card

    shown = run_cli("info", str(output))
    assert shown.returncode == 0, shown.stderr
    assert "8 = 2 copies x granularity 4" in shown.stdout and "yes" in shown.stdout
    # 2 layers x 4 inactive experts x (3 x 64 x 24) parameters each are not active.
    totals = [line for line in shown.stdout.splitlines() if "parameters" in line]
    total = int(totals[0].split("│")[2].strip().replace(",", ""))
    active = int(totals[1].split("│")[2].split("(")[0].strip().replace(",", ""))
    assert total - active == 2 * 4 * 3 * 64 * 24


def test_info_says_when_not_exact(dense_models, tmp_path):
    output = tmp_path / "k2"
    assert run_cli("upcycle", str(dense_models["llama"]), "--to", "fine-moe", "--granularity", "4", "--top-k", "2", "-o", str(output)).returncode == 0
    shown = run_cli("info", str(output))
    assert "no" in shown.stdout and "top-k 2 < granularity 4" in shown.stdout


def test_unknown_model(tmp_path):
    output = tmp_path / "x"
    result = run_cli("upcycle", "no-such-org/no-such-model", "-o", str(output))
    assert_clean_failure(result, output, "no-such-org/no-such-model", "Hub could not provide it")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    source = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(source)
    output = tmp_path / "x"
    result = run_cli("upcycle", str(source), "--to", "moe", "-o", str(output))
    assert_clean_failure(result, output, "'gpt2' is not supported", "llama", "qwen2", "qwen3")


def test_granularity_must_divide_d_ff(dense_models, tmp_path):
    output = tmp_path / "x"
    result = run_cli("upcycle", str(dense_models["llama"]), "--granularity", "5", "-o", str(output))
    assert_clean_failure(result, output, "granularity 5 does not divide", "d_ff=96")


def test_top_k_above_expert_count(dense_models, tmp_path):
    output = tmp_path / "x"
    result = run_cli("upcycle", str(dense_models["qwen3"]), "--to", "moe", "--experts", "2", "--top-k", "3", "-o", str(output))
    assert_clean_failure(result, output, "top-k 3", "2")


def test_option_of_another_variant(dense_models, tmp_path):
    output = tmp_path / "x"
    result = run_cli("upcycle", str(dense_models["llama"]), "--to", "moe", "--granularity", "4", "-o", str(output))
    assert_clean_failure(result, output, "--granularity", "--to moe")


def test_existing_output_is_refused_then_overwritten(dense_models, tmp_path):
    output = tmp_path / "x"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    result = run_cli("upcycle", str(dense_models["llama"]), "--to", "moe", "--experts", "2", "-o", str(output))
    assert result.returncode != 0 and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert (output / "precious.txt").read_text() == "keep me"
    result = run_cli("upcycle", str(dense_models["llama"]), "--to", "moe", "--experts", "2", "-o", str(output), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (output / "precious.txt").exists() and (output / "config.json").exists()


def test_pickle_checkpoint_needs_consent(tmp_path):
    source = tmp_path / "pickled"
    model = build_dense("llama")
    source.mkdir()
    model.config.save_pretrained(source)
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    output = tmp_path / "x"
    assert_clean_failure(run_cli("upcycle", str(source), "--to", "moe", "-o", str(output)), output, "--allow-pickle")
    result = run_cli("upcycle", str(source), "--to", "moe", "--experts", "2", "-o", str(output), "--allow-pickle")
    assert result.returncode == 0, result.stderr


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    output = tmp_path / "x"
    assert_clean_failure(run_cli("upcycle", str(tmp_path / "empty"), "-o", str(output)), output, "no config.json")
    assert_clean_failure(run_cli("info", str(tmp_path / "empty")), output, "not a model folder")
