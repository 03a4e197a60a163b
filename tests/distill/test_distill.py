"""`sparsify distill`: the folded students reproduce the parent where the math says they must, load with
plain transformers, train against the sparse model (online or from the teacher cache), resume after a
kill, and bad input is refused in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import tiny_options
from sparsify.convert.distill.options import DistillOptions
from sparsify.convert.distill.run import distill
from sparsify.errors import SparsifyError
from sparsify.upcycle import upcycle

IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 429, 2940, 12]])

VANILLA = r"""
import sys, json, torch
sys.modules["sparsify"] = None  # any attempt to import sparsify now fails
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(model(torch.tensor(json.loads(sys.argv[2]))).logits, sys.argv[3])
print(type(model).__name__)
"""


def _logits(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def _fold(model, output, corpus, **options):
    """The folded student alone (--tokens 0): no training."""
    settings = DistillOptions(calibration_data=str(corpus["train"]), calibration_tokens="2k", calibration_seq_len=64, **options)
    return distill(model, output, settings, None)


@pytest.mark.parametrize("family,options", [
    ("llama", dict(granularity=4)),
    ("qwen2", dict(granularity=4, shared_experts=1)),  # Qwen2-MoE's gated shared expert, the gate's mean folded in
    ("qwen3", dict(granularity=4, shared_experts=1)),  # GLM-4.5-MoE, sigmoid routing, qwen3 attention
])
def test_concat_of_an_exact_fine_grained_conversion_is_the_parent(dense_models, corpus, tmp_path, family, options):
    moe = upcycle(str(dense_models[family]), "fine-moe", tmp_path / "moe", **options).output
    student = _fold(moe, tmp_path / "dense", corpus, init="concat").output
    assert json.loads((student / "config.json").read_text())["model_type"] == family
    torch.testing.assert_close(_logits(student), _logits(dense_models[family]), rtol=0, atol=1e-4)


def test_merge_of_identical_copies_is_the_parent_and_loads_without_sparsify(dense_models, corpus, tmp_path):
    moe = upcycle(str(dense_models["llama"]), "moe", tmp_path / "moe", experts=3, top_k=2).output
    student = _fold(moe, tmp_path / "dense", corpus, init="merge").output
    done = subprocess.run([sys.executable, "-c", VANILLA, str(student), json.dumps(IDS.tolist()), str(tmp_path / "logits.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "LlamaForCausalLM"
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), _logits(dense_models["llama"]), rtol=0, atol=1e-4)
    record = json.loads((student / "distill.json").read_text())
    frequency = record["init"]["usage"][0]["frequency"]
    assert len(frequency) == 3 and sum(frequency) == pytest.approx(2.0)  # top-2 of 3: two choices per token


def test_inits_differ_once_the_copies_do(dense_models, corpus, tmp_path):
    """Copies made different (Drop-Upcycling): merge, concat and top1 give three different students."""
    moe = upcycle(str(dense_models["llama"]), "moe", tmp_path / "moe", experts=3, top_k=2, reinit_ratio=0.5).output
    logits = {init: _logits(_fold(moe, tmp_path / init, corpus, init=init).output) for init in ("merge", "concat", "top1")}
    assert not torch.allclose(logits["merge"], logits["top1"], atol=1e-4)
    assert not torch.allclose(logits["merge"], logits["concat"], atol=1e-4)


def test_parent_init_is_the_recorded_source(dense_models, corpus, tmp_path):
    moe = upcycle(str(dense_models["llama"]), "moe", tmp_path / "moe", experts=2, top_k=1, reinit_ratio=0.5).output
    student = _fold(moe, tmp_path / "dense", corpus, init="parent").output
    torch.testing.assert_close(_logits(student), _logits(dense_models["llama"]), rtol=0, atol=0)


@pytest.fixture(scope="module")
def trained_moe(dense_models, corpus, tmp_path_factory):
    """An upcycled MoE whose experts trained on the text (so the sparse teacher differs from the parent)."""
    from sparsify.train.loop import train

    folder = tmp_path_factory.mktemp("trained")
    moe = upcycle(str(dense_models["llama"]), "moe", folder / "moe", experts=3, top_k=2).output
    options = tiny_options(corpus, tokens="512", train_experts="full", expert_lr=1e-2, ce_weight=1.0, kl_weight=0.0)
    return train(moe, options, output=folder / "trained").output


def test_distilled_student_trains_against_the_sparse_model(trained_moe, corpus, tmp_path):
    settings = DistillOptions(init="merge", hard_weight=0.0, calibration_tokens="2k", calibration_seq_len=64)
    result = distill(trained_moe, tmp_path / "dense", settings, tiny_options(corpus, tokens="512", train_experts="full", expert_lr=1e-3))
    assert result.training.steps == 4
    before, after = result.training.before, result.training.after
    assert before["teacher_ppl"] == after["teacher_ppl"]  # the teacher is the trained MoE, frozen
    assert before["kl"] > 0  # the merged student is not the MoE
    assert after["kl"] < before["kl"]
    record = json.loads((result.output / "distill.json").read_text())
    assert record["teacher"] == str(trained_moe) and record["training"]["options"]["train_experts"] == "full"
    assert record["training"]["options"]["ce_weight"] == 0.0 and record["training"]["options"]["kl_weight"] == 1.0


def test_hidden_state_loss_matches_the_student_ffns_to_the_sparse_blocks(trained_moe, corpus, tmp_path):
    settings = DistillOptions(init="parent", hard_weight=0.0, calibration_tokens="2k", calibration_seq_len=64)
    options = tiny_options(corpus, tokens="1024", train_experts="full", expert_lr=1e-3, hidden_weight=1.0)
    history = distill(trained_moe, tmp_path / "dense", settings, options).training.history
    hidden = [entry["hidden"] for entry in history]
    assert len(hidden) == 8 and hidden[0] > 0  # the parent's FFNs differ from the trained MoE blocks
    assert sum(hidden[-2:]) < sum(hidden[:2])


def test_a_killed_distillation_resumes_on_the_same_curve(trained_moe, corpus, tmp_path):
    settings = DistillOptions(init="concat", calibration_tokens="2k", calibration_seq_len=64)
    options = tiny_options(corpus, tokens="768", checkpoint_every=2, cache_teacher=str(tmp_path / "cache"))
    straight = distill(trained_moe, tmp_path / "straight", settings, options)

    class Stop(Exception):
        pass

    def stop_at_three(entry):
        if entry["step"] == 3:
            raise Stop

    with pytest.raises(Stop):
        distill(trained_moe, tmp_path / "killed", settings, options, train_callbacks={"on_step": stop_at_three})
    with pytest.raises(SparsifyError, match="--resume"):
        distill(trained_moe, tmp_path / "killed", settings, options)
    resumed = distill(trained_moe, tmp_path / "killed", settings, options, resume=True)
    assert resumed.training.start_step == 2
    curve = [(e["step"], e["total"]) for e in straight.training.history]
    assert [(e["step"], e["total"]) for e in resumed.training.history] == curve[2:]
    torch.testing.assert_close(_logits(resumed.output), _logits(straight.output), rtol=0, atol=0)


def test_cached_teacher_kl_is_the_online_kl_where_k_covers_the_vocabulary(trained_moe, corpus, tmp_path):
    settings = DistillOptions(init="merge", calibration_tokens="2k", calibration_seq_len=64)
    online = distill(trained_moe, tmp_path / "online", settings, tiny_options(corpus, tokens="256"))
    cached = distill(trained_moe, tmp_path / "cached", settings,
                     tiny_options(corpus, tokens="256", cache_teacher=str(tmp_path / "cache"), cache_top_k=49152))
    for a, b in zip(online.training.history, cached.training.history):
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-6)
    again = distill(trained_moe, tmp_path / "again", settings,  # a second run reads the cache: the same curve exactly
                    tiny_options(corpus, tokens="256", cache_teacher=str(tmp_path / "cache"), cache_top_k=49152))
    assert [e["kl"] for e in again.training.history] == [e["kl"] for e in cached.training.history]
    with pytest.raises(SparsifyError, match="holds a cache for another run .*top_k"):
        distill(trained_moe, tmp_path / "other", settings, tiny_options(corpus, tokens="256", cache_teacher=str(tmp_path / "cache")))


def test_top_k_kl_is_exact_over_the_whole_vocabulary_and_bounded_below_it():
    from sparsify.train.losses import kl_to_teacher, kl_to_top_k
    from sparsify.train.teacher_cache import top_k_targets

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 7, 500, requires_grad=True), torch.randn(2, 7, 500) * 3
    for temperature in (1.0, 2.0):
        whole = top_k_targets(teacher, 500, temperature)
        assert torch.equal(whole.tail, torch.zeros(2, 7))
        exact = kl_to_teacher(student, teacher, temperature)
        cached = kl_to_top_k(student, whole.logprobs, whole.ids, whole.tail, temperature)
        torch.testing.assert_close(cached, exact, rtol=1e-5, atol=1e-6)
        grads = [torch.autograd.grad(loss, student)[0] for loss in (exact, cached)]
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
        part = top_k_targets(teacher, 32, temperature)
        coarse = kl_to_top_k(student, part.logprobs, part.ids, part.tail, temperature)
        assert 0 < coarse.item() <= exact.item() + 1e-6  # coarsening a pair of distributions never raises their KL


# --- bad input -----------------------------------------------------------------------------------


def _one_line_error(call, match: str):
    with pytest.raises(SparsifyError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


def test_a_dense_model_is_refused(dense_models, tmp_path):
    _one_line_error(lambda: distill(dense_models["llama"], tmp_path / "out", DistillOptions(), None), "is a dense model already .* Upcycle it first")


def test_a_skip_model_is_refused(dense_models, tmp_path):
    skip = upcycle(str(dense_models["llama"]), "skip", tmp_path / "skip").output
    _one_line_error(lambda: distill(skip, tmp_path / "out", DistillOptions(), None), "is a skip model, which has no routed experts")
    assert not (tmp_path / "out").exists()


def test_an_moe_family_without_a_dense_mapping_is_refused(dense_models, tmp_path):
    folder = tmp_path / "olmoe"
    shutil.copytree(dense_models["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "olmoe", "num_experts": 8}))
    _one_line_error(lambda: distill(folder, tmp_path / "out", DistillOptions(), None), "no dense architecture is known for 'olmoe'")


def test_a_teacher_with_another_tokenizer_is_refused(dense_models, corpus, tmp_path):
    moe = upcycle(str(dense_models["llama"]), "moe", tmp_path / "moe", experts=2, top_k=1).output
    other = tmp_path / "other"
    shutil.copytree(dense_models["llama"], other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, two tokens swapped
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    _one_line_error(lambda: distill(moe, tmp_path / "out", DistillOptions(teacher=str(other)), tiny_options(corpus)),
                    "--teacher .* has another tokenizer")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()


def test_bad_distill_options_are_refused():
    _one_line_error(lambda: DistillOptions(init="average").validate(), "--init must be one of merge, concat, top1, parent")
    _one_line_error(lambda: DistillOptions(hard_weight=1.5).validate(), "--hard-weight")


def test_the_command_line_folds_without_training(students, corpus, tmp_path):
    from support import sparsify_command

    done = subprocess.run([*sparsify_command(), "distill", str(students["exact"]), "-o", str(tmp_path / "dense"), "--init", "concat",
                           "--tokens", "0", "--data", str(corpus["train"]), "--calibration-tokens", "2k", "--calibration-seq-len", "64"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "not trained (--tokens 0)" in done.stdout
    dense_source = json.loads((students["exact"] / "sparsify.json").read_text())["source"]["path"]
    torch.testing.assert_close(_logits(tmp_path / "dense"), _logits(dense_source), rtol=0, atol=1e-4)
