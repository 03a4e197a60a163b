"""Router training: losses, data packing, teacher-in-the-student, resume, NaN guard, merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from support import sparsify_command, tiny_options
from sparsify.data import DataSpec, TokenFile, block_order, materialise, split_documents
from sparsify.errors import SparsifyError
from sparsify.train import losses
from sparsify.train.lora import LoraSettings, add_adapters, merge_adapters
from sparsify.train.loop import train
from sparsify.option_values import parse_count
from sparsify.convert.moe.decisions import Routers, dense_path, load_balancing_loss, prepare_routers
from sparsify.convert.moe.options import MoeTrainOptions


def test_parse_count():
    assert parse_count("20M") == 20_000_000 and parse_count("512k") == 512_000 and parse_count("1.5m") == 1_500_000
    with pytest.raises(SparsifyError):
        parse_count("lots")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_load_balancing_loss_is_minimal_for_a_uniform_router(kind):
    even = torch.arange(64 * 2).view(64, 2) % 8  # every expert chosen equally often
    uniform = load_balancing_loss([(torch.zeros(64, 8), even)], kind)
    assert uniform.item() == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(0)
    for scale in (0.5, 2.0, 8.0):
        skewed = torch.randn(64, 8, generator=generator) * scale + torch.linspace(0, scale, 8)
        assert load_balancing_loss([(skewed, skewed.topk(2, dim=-1).indices)], kind) > uniform


def test_kl_is_zero_for_identical_and_positive_for_different_logits():
    logits = torch.randn(2, 5, 11)
    assert losses.kl_to_teacher(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.kl_to_teacher(logits + torch.randn_like(logits), logits) > 0.01


def test_data_packing_is_exact_and_heldout_is_disjoint(corpus, real_tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir)
    spec = DataSpec((str(corpus["train"]),), heldout_fraction=0.25)
    paths = materialise(spec, tokenizer, tmp_path, train_tokens=10**9, eval_tokens=10**9)
    train_docs = list(split_documents(spec, heldout=False))
    heldout_docs = list(split_documents(spec, heldout=True))
    assert train_docs and heldout_docs and not set(train_docs) & set(heldout_docs)
    expected = []
    for text in train_docs:
        expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    stream = np.fromfile(paths["train"], dtype=np.int32)
    assert stream.tolist() == expected
    blocks = TokenFile(paths["train"], seq_len=50)
    every_block = blocks.blocks(torch.arange(blocks.num_blocks))
    assert every_block.reshape(-1).tolist() == expected[: blocks.num_blocks * 50]
    order = block_order(blocks.num_blocks, seed=3, start=0, count=blocks.num_blocks)
    assert sorted(order.tolist()) == list(range(blocks.num_blocks))  # one epoch visits every block once
    assert torch.equal(block_order(blocks.num_blocks, 3, 5, 7), order[5:12])  # any position is reproducible


def test_student_is_its_own_teacher(students):
    model = AutoModelForCausalLM.from_pretrained(students["half"]).eval()
    routers = prepare_routers(model)
    layout = json.loads((students["half"] / "sparsify.json").read_text())["layout"]
    model = add_adapters(model, LoraSettings(rank=4), Routers(routers, MoeTrainOptions()))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # make the adapters matter
            torch.nn.init.normal_(param, std=0.05)
    source = json.loads((students["half"] / "sparsify.json").read_text())["source"]["path"]
    dense = AutoModelForCausalLM.from_pretrained(source).eval()
    ids = torch.randint(0, 4000, (2, 24))
    with torch.no_grad():
        teacher = dense(ids).logits
        with model.disable_adapter(), dense_path(routers, layout):
            recovered = model(ids).logits
        student = model(ids).logits
    torch.testing.assert_close(recovered, teacher, rtol=0, atol=1e-4)
    assert losses.kl_to_teacher(student, teacher) > 1e-3


def test_exact_student_has_zero_kl_and_merging_keeps_logits(students, corpus, tmp_path):
    result = train(students["exact"], tiny_options(corpus, tokens="128"), output=tmp_path / "out")
    assert result.before["kl"] < 1e-6  # function-preserving conversion: the student starts as the teacher
    assert result.before["student_ppl"] == pytest.approx(result.before["teacher_ppl"], rel=1e-5)
    # The saved model is the merged student, in the native format.
    merged = AutoModelForCausalLM.from_pretrained(result.output).eval()
    ids = torch.tensor(np.fromfile(result.run_dir / "data" / "heldout.tokens", dtype=np.int32)[:32].astype(np.int64))[None]
    with torch.no_grad():
        logits = merged(ids).logits
    assert torch.isfinite(logits).all()
    record = json.loads((result.output / "sparsify.json").read_text())
    assert record["layout"]["dense_path"] is None and record["training"][0]["tokens"] == result.tokens


def test_merged_lora_reproduces_unmerged_logits(students):
    model = AutoModelForCausalLM.from_pretrained(students["half"]).eval()
    routers = prepare_routers(model)
    model = add_adapters(model, LoraSettings(rank=4), Routers(routers, MoeTrainOptions()))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    ids = torch.randint(0, 4000, (2, 24))
    with torch.no_grad():
        unmerged = model(ids).logits
        merged = merge_adapters(model)(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-4)


def test_training_lowers_the_kl_of_a_perturbed_student(students, corpus, tmp_path):
    result = train(students["misrouted"], tiny_options(corpus, tokens="4096", eval_tokens="1024"), output=tmp_path / "out")
    assert result.before["kl"] > 1e-2
    assert result.after["kl"] < 0.85 * result.before["kl"]  # measured: 0.132 -> 0.098
    assert all(np.isfinite(entry["kl"]) for entry in result.history)
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert {"kl", "ce", "balance", "z", "lr", "tokens_per_s"} <= set(log[1])


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(students, corpus, tmp_path):
    options = tiny_options(corpus, lr=1e30, router_lr=1e30, checkpoint_every=1, warmup=0.0, max_grad_norm=0.0)
    with pytest.raises(SparsifyError, match="loss became .* at step 2.*last good checkpoint"):
        train(students["half"], options, output=tmp_path / "out")
    state = json.loads((tmp_path / "out.run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1
    assert not (tmp_path / "out").exists()


def _run(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([*sparsify_command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def _losses_by_step(log: Path) -> dict[int, tuple[float, float]]:
    """step -> (kl, total of the other parts) for every training step in a log."""
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return {e["step"]: (e["kl"], e["ce"] + e["balance"] + e["z"]) for e in entries if "kl" in e}


def test_killed_run_resumes_to_the_same_loss_curve(students, corpus, tmp_path):
    flags = [
        "--data", str(corpus["train"]), "--eval-data", str(corpus["valid"]), "--tokens", "3072", "--seq-len", "32",
        "--batch-size", "4", "--eval-every", "0", "--eval-tokens", "256", "--checkpoint-every", "3",
        "--lr", "3e-3", "--router-lr", "3e-2", "--lora-rank", "4", "--lora-alpha", "8",
    ]
    straight = _run(["train", str(students["half"]), "-o", str(tmp_path / "straight"), *flags])
    assert straight.wait(timeout=900) == 0, straight.stderr.read()
    reference = _losses_by_step(tmp_path / "straight.run" / "log.jsonl")
    assert len(reference) == 24

    log = tmp_path / "killed.run" / "log.jsonl"
    victim = _run(["train", str(students["half"]), "-o", str(tmp_path / "killed"), *flags])
    deadline = time.time() + 600
    while not (log.exists() and len(log.read_text().splitlines()) >= 9):
        assert victim.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert not (tmp_path / "killed").exists()
    again = _run(["train", str(students["half"]), "-o", str(tmp_path / "killed"), *flags])
    assert again.wait(timeout=60) != 0 and "--resume" in again.stderr.read()
    resumed = _run(["train", str(students["half"]), "-o", str(tmp_path / "killed"), "--resume", *flags])
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()
    assert _losses_by_step(log) == reference


def test_upcycle_with_train_through_the_cli(dense_models, corpus, tmp_path):
    output = tmp_path / "trained"
    done = _run([
        "upcycle", str(dense_models["qwen3"]), "--to", "fine-moe", "--granularity", "4", "--top-k", "2", "-o", str(output),
        "--train", "--data", str(corpus["train"]), "--eval-data", str(corpus["valid"]), "--tokens", "1024", "--seq-len", "32",
        "--batch-size", "4", "--eval-tokens", "256", "--lora-rank", "4",
    ])
    stdout, stderr = done.communicate(timeout=900)
    assert done.returncode == 0, stderr
    assert "training ->" in stdout and "KL(teacher || student)" in stdout
    record = json.loads((output / "sparsify.json").read_text())
    assert record["variant"] == "fine-moe" and record["training"][0]["steps"] == 8
    # No --lr / --router-lr given: the run used (and recorded) fine-moe's tuned rates.
    assert (record["training"][0]["options"]["lr"], record["training"][0]["options"]["router_lr"]) == (2e-3, 1e-2)
    assert "Routers trained" in (output / "README.md").read_text()
    shown = subprocess.run([*sparsify_command(), "info", str(output)], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert "training" in shown.stdout and "1,024 tokens" in shown.stdout
    assert not (tmp_path / "trained.run" / "checkpoint").exists()  # a finished run leaves no checkpoint behind
    model = AutoModelForCausalLM.from_pretrained(output)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"


def test_training_options_are_checked_before_converting(dense_models, tmp_path):
    output = tmp_path / "x"
    done = _run(["upcycle", str(dense_models["llama"]), "--train", "--tokens", "1M", "-o", str(output)])
    _, stderr = done.communicate(timeout=300)
    assert done.returncode != 0 and "--data is required" in stderr
    assert not output.exists()


def test_separate_teacher_matches_the_self_teacher_and_is_required_after_training(students, corpus, tmp_path):
    source = json.loads((students["half"] / "sparsify.json").read_text())["source"]["path"]
    own = train(students["half"], tiny_options(corpus, tokens="128"), output=tmp_path / "own")
    separate = train(students["half"], tiny_options(corpus, tokens="128", teacher=source), output=tmp_path / "separate")
    assert separate.before["teacher_ppl"] == pytest.approx(own.before["teacher_ppl"], rel=1e-5)
    assert separate.before["kl"] == pytest.approx(own.before["kl"], rel=1e-4)
    with pytest.raises(SparsifyError, match="no longer contain its dense teacher"):
        train(own.output, tiny_options(corpus, tokens="128"), output=tmp_path / "again")
    again = train(own.output, tiny_options(corpus, tokens="128", teacher=source), output=tmp_path / "again")
    assert again.before["teacher_ppl"] == pytest.approx(own.before["teacher_ppl"], rel=1e-5)


def test_parquet_and_txt_sources_read_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparsify.data import iter_documents

    texts = ["first document\nwith two lines", "second", "third one"]
    pq.write_table(pa.table({"content": texts}), tmp_path / "docs.parquet")
    assert list(iter_documents(str(tmp_path / "docs.parquet"), text_field="content")) == texts
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    assert list(iter_documents(str(tmp_path / "*.txt"))) == texts
    with pytest.raises(SparsifyError, match="no 'text' column"):
        list(iter_documents(str(tmp_path / "docs.parquet")))
    with pytest.raises(SparsifyError, match="not a Hub dataset id"):
        list(iter_documents(str(tmp_path / "missing*.jsonl")))


def test_chunked_kl_equals_the_whole_batch_formula_in_value_and_gradient(monkeypatch):
    import torch.nn.functional as F

    monkeypatch.setattr(losses, "CHUNK_TOKENS", 7)  # several chunks, the last one partial
    student = torch.randn(3, 10, 50, requires_grad=True)
    teacher = torch.randn(3, 10, 50)
    for temperature in (1.0, 2.0):
        chunked = losses.kl_to_teacher(student, teacher, temperature)
        (grad_chunked,) = torch.autograd.grad(chunked, student)
        whole = F.kl_div(
            F.log_softmax(student.reshape(-1, 50) / temperature, -1), F.log_softmax(teacher.reshape(-1, 50) / temperature, -1),
            log_target=True, reduction="batchmean",
        ) * temperature**2
        (grad_whole,) = torch.autograd.grad(whole, student)
        torch.testing.assert_close(chunked, whole)
        torch.testing.assert_close(grad_chunked, grad_whole)


def test_router_math_stays_in_fp32_under_bf16_autocast(students):
    model = AutoModelForCausalLM.from_pretrained(students["half"], dtype=torch.bfloat16).eval()
    router = prepare_routers(model)[0]
    router.weight.data = router.weight.data.float()
    hidden = torch.randn(6, router.weight.shape[1], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, weights, _ = router(hidden)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hidden.float() @ router.weight.t(), rtol=0, atol=1e-6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(6), rtol=0, atol=1e-6)
