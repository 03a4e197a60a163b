"""What the CLI tells a user is true: bad input fails in one line before any model loads and leaves
nothing behind, training says what it is doing, interrupts say how to resume, start-up is light."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from support import sparsify_command, tiny_options
from sparsify.errors import SparsifyError
from sparsify.eval.options import EvalOptions
from sparsify.train.loop import TrainingInterrupted, cpu_notice, train
from sparsify.train.options import TrainOptions


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([*sparsify_command(), *args], capture_output=True, text=True, env=env, timeout=600)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error:")
    return lines[0]


# --- start-up -----------------------------------------------------------------------------------


def test_the_cli_module_imports_neither_torch_nor_transformers():
    probe = "import sys, sparsify.cli; print([m for m in ('torch', 'transformers') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_help_and_argument_errors_come_back_fast():
    started = time.perf_counter()
    shown = run_cli("--help")
    wrong = run_cli("upcycle", "--no-such-flag")
    elapsed = time.perf_counter() - started
    assert shown.returncode == 0 and "upcycle" in shown.stdout
    assert wrong.returncode == 2 and "--no-such-flag" in wrong.stderr
    # Two processes; importing torch + transformers alone takes 4-6 s on this machine.
    assert elapsed < 8, elapsed


@pytest.mark.parametrize("order", ["sparsify first", "transformers first"])
def test_import_sparsify_registers_the_skip_architecture_whenever_transformers_arrives(order):
    imports = "import sparsify; import transformers" if order == "sparsify first" else "import transformers; import sparsify"
    probe = f"{imports}; from transformers import AutoConfig; print(type(AutoConfig.for_model('sparsify_skip')).__name__)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SkipConfig"


def test_a_shared_flag_explains_itself_for_each_variant():
    shown = run_cli("upcycle", "--help")
    flat = " ".join(shown.stdout.split())
    assert "moe: Number of experts" in flat and "fine-moe: E: copies of the FFN" in flat


# --- bad options, refused before anything loads -------------------------------------------------


@pytest.mark.parametrize(("flag", "value", "words"), [
    ("lr", -0.5, "--lr -0.5: must be greater than 0"),
    ("router_lr", 0.0, "--router-lr 0.0: must be greater than 0"),
    ("warmup", 1.5, "--warmup 1.5: is a fraction"),
    ("weight_decay", -0.1, "--weight-decay -0.1: must be 0 or more"),
    ("temperature", 0.0, "--temperature 0.0: must be greater than 0"),
    ("kl_weight", -1.0, "--kl-weight -1.0: must be 0 or more"),
    ("hidden_weight", -1.0, "--hidden-weight -1.0: must be 0 or more"),
    ("router_first", 1.0, "--router-first 1.0: is a fraction"),
    ("balance_weight", -0.01, "--balance-weight"),
    ("z_weight", -1.0, "--z-weight"),
    ("skip_weight", -1.0, "--skip-weight"),
    ("lora_alpha", 0.0, "--lora-alpha"),
    ("max_grad_norm", -1.0, "--max-grad-norm"),
    ("tokens", "0", "--tokens 0: train on at least one token"),
    ("eval_tokens", "16", "--eval-tokens 16 is less than one --seq-len block"),
    ("lora_targets", "mlp", "--lora-targets must name attention and/or experts"),
])
def test_nonsensical_training_options_are_refused_with_their_flag(corpus, flag, value, words):
    with pytest.raises(SparsifyError) as refused:
        tiny_options(corpus, **{flag: value}).validate()
    assert words in str(refused.value)


def test_all_loss_weights_zero_is_refused(corpus):
    with pytest.raises(SparsifyError, match="all 0"):
        tiny_options(corpus, kl_weight=0.0, ce_weight=0.0).validate()


@pytest.mark.parametrize(("settings", "words"), [
    ({"tokens": "0"}, "--tokens 0: score at least 2 tokens"),
    ({"routing_tokens": "0"}, "--routing-tokens 0"),
    ({"window": 1}, "--window 1"),
    ({"stride": 600, "window": 512}, "--stride must be at least 1 and below --window"),
    ({"speed_batch": "1,x"}, "--speed-batch takes comma-separated batch sizes"),
    ({"decode_tokens": -1}, "--decode-tokens -1"),
    ({"data": "missing-file.jsonl.gz"}, "--data: no files match 'missing-file.jsonl.gz'"),
])
def test_nonsensical_eval_options_are_refused_with_their_flag(corpus, settings, words):
    with pytest.raises(SparsifyError) as refused:
        EvalOptions(**{"data": str(corpus["valid"]), **settings}).validate()
    assert words in str(refused.value)


def test_train_with_a_negative_lr_fails_in_one_line_and_leaves_no_run_folder(students, corpus, tmp_path):
    output = tmp_path / "out"
    done = run_cli("train", str(students["half"]), "-o", str(output), "--data", str(corpus["train"]), "--lr", "-0.5")
    assert "--lr -0.5" in one_error_line(done)
    assert not output.exists() and not (tmp_path / "out.run").exists()


def test_missing_data_is_refused_before_the_model_loads(students, tmp_path):
    started = time.perf_counter()
    done = run_cli("train", str(students["half"]), "-o", str(tmp_path / "out"), "--data", str(tmp_path / "nothing*.jsonl"))
    assert "--data: no files match" in one_error_line(done)
    evaluated = run_cli("eval", str(students["half"]), "--data", str(tmp_path / "none.jsonl"))
    assert "--data: no files match" in one_error_line(evaluated)
    assert time.perf_counter() - started < 15  # no model was loaded: two bare process start-ups


def test_a_truncated_weight_file_is_one_line_for_every_command(students, corpus, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(students["half"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for args in (["eval", str(broken), "--data", str(corpus["valid"])],
                 ["eval", str(students["half"]), "--teacher", str(broken), "--data", str(corpus["valid"])],
                 ["train", str(broken), "-o", str(tmp_path / "t"), "--data", str(corpus["train"])],
                 ["upcycle", str(broken), "--to", "moe", "-o", str(tmp_path / "u")]):
        assert "is truncated" in one_error_line(run_cli(*args)), args
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.run").exists() and not (tmp_path / "u").exists()


def test_a_dense_folder_is_not_trained_against_itself(dense_models, corpus, tmp_path):
    done = run_cli("train", str(dense_models["llama"]), "-o", str(tmp_path / "out"), "--data", str(corpus["train"]))
    line = one_error_line(done)
    assert "is a dense model" in line and "sparsify upcycle" in line and "--teacher" in line


def test_skip_sweep_refuses_bad_thresholds_in_one_line(tmp_path):
    done = run_cli("skip-sweep", str(tmp_path), "--thresholds", "0.5,abc", "--teacher", "x", "--data", "y")
    assert "--thresholds takes comma-separated float values between 0 and 1" in one_error_line(done)


def test_a_failed_run_leaves_no_run_folder(students, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(SparsifyError, match="no train text"):
        train(students["half"], TrainOptions.of(data=str(empty), tokens="64", seq_len=16, eval_tokens="16"), output=tmp_path / "out")
    assert not (tmp_path / "out.run").exists() and not (tmp_path / "out").exists()


# --- what training says -------------------------------------------------------------------------


def test_a_long_cpu_run_is_announced_with_its_expected_duration(students):
    notice = cpu_notice(students["half"], 5_000_000)
    # The tiny student has ~3M active parameters: 2-10 tokens/s at 135M scale to ~90-450 tokens/s.
    assert "no GPU" in notice and "tokens/s for this model" in notice and "hours" in notice
    assert cpu_notice(students["half"], 2_000) is None


def test_training_announces_its_plan_and_phases(students, corpus, tmp_path):
    events: list[tuple[str, object]] = []
    result = train(students["half"], tiny_options(corpus), output=tmp_path / "out",
                   on_plan=lambda total, start: events.append(("plan", (total, start))),
                   on_status=lambda text: events.append(("status", text)),
                   on_notice=lambda text: events.append(("notice", text)),
                   on_step=lambda entry: events.append(("step", entry["step"])))
    assert events[0] == ("plan", (result.steps, 0)) and result.steps == 1536 // (32 * 4)
    assert "notice" not in [kind for kind, _ in events]  # 1,536 tokens of a tiny model: seconds, no warning
    statuses = [text for kind, text in events if kind == "status"]
    assert any(text.startswith("held-out evaluation before training") for text in statuses)
    assert statuses[-1].startswith("merging")
    final = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()][-1]
    assert final["peak_memory_bytes"] == result.peak_memory_bytes  # the summary prints what the log holds


def test_interrupt_before_a_checkpoint_says_there_is_nothing_to_resume(students, corpus, tmp_path):
    def stop(entry):
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="--checkpoint-every 0 writes no checkpoints, so there is nothing to resume"):
        train(students["half"], tiny_options(corpus), output=tmp_path / "out", on_step=stop)
    assert not (tmp_path / "out.run").exists()


def test_interrupt_after_a_checkpoint_says_how_to_resume_and_the_resume_reports_its_part(students, corpus, tmp_path):
    def stop_at_step_3(entry):
        if entry["step"] == 3:
            raise KeyboardInterrupt

    options = tiny_options(corpus, checkpoint_every=2)
    with pytest.raises(TrainingInterrupted, match=r"last checkpoint is in .*out\.run; continue with `sparsify train .*half -o .*out --resume`"):
        train(students["half"], options, output=tmp_path / "out", on_step=stop_at_step_3)
    resumed = train(students["half"], options, output=tmp_path / "out", resume=True)
    assert resumed.start_step == 2 and resumed.steps == 12
    assert resumed.session_tokens == 10 * 32 * 4 and resumed.tokens == 12 * 32 * 4


@pytest.mark.slow
def test_the_real_model_converts_to_skip_quietly_with_its_tied_embedding_stored_once(tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "smol-skip"
    done = run_cli("upcycle", "smollm2-135m", "--to", "skip", "-o", str(output))
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr  # no progress bars or warnings leak
    loaded = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    params = sum(p.numel() for p in loaded.parameters())
    assert params == 134_549_628 and f"{params:,} total" in done.stdout
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    weights = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    assert 537e6 < weights < 539e6  # 651 MB when lm_head was written as a copy


def test_skip_freeze_checks_its_calibration_text_and_count_before_loading(tmp_path):
    from sparsify.convert.skip.freezing import FreezeRule
    from sparsify.convert.skip.frozen_copy import write_frozen_copy
    from sparsify.upcycle import upcycle

    from support import build_dense

    dense = tmp_path / "dense"
    build_dense("llama").save_pretrained(dense)
    skip = upcycle(str(dense), "skip", tmp_path / "skip").output
    with pytest.raises(SparsifyError, match="--data: no files match"):
        write_frozen_copy(skip, tmp_path / "out", FreezeRule(0.05), str(tmp_path / "missing.jsonl"))
    with pytest.raises(SparsifyError, match="--tokens 0: calibrate on at least one token"):
        write_frozen_copy(skip, tmp_path / "out", FreezeRule(0.05), str(tmp_path / "missing.jsonl"), tokens="0")
    assert not (tmp_path / "out").exists()


def test_a_lookup_of_transformers_before_its_import_does_not_disarm_the_registration():
    probe = ("import importlib.util, sparsify; importlib.util.find_spec('transformers'); import transformers; "
             "from transformers import AutoConfig; print(type(AutoConfig.for_model('sparsify_skip')).__name__)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SkipConfig"


@pytest.mark.parametrize(("args", "words"), [
    (["--to", "fine-moe", "--granularity", "0"], "--granularity and --experts must be at least 1"),
    (["--to", "moe", "--experts", "0"], "--experts must be at least 1"),
    (["--to", "skip", "--threshold", "1.5"], "--threshold must be between 0 and 1"),
    (["--to", "skip", "--gates", "mlp"], "--gates must be one of both, attention, ffn"),
    (["--to", "fine-moe", "--split", "odd"], "--split must be one of contiguous, random"),
    (["--to", "moe", "--dtype", "int8"], "--dtype must be auto or one of"),
])
def test_upcycle_refuses_bad_variant_options_before_opening_the_model(tmp_path, args, words):
    # The model does not even exist: the options are refused before anyone looks for it.
    output = tmp_path / "x"
    line = one_error_line(run_cli("upcycle", str(tmp_path / "no-model-here"), *args, "-o", str(output)))
    assert words in line and not output.exists()


def test_upcycle_with_train_refuses_a_missing_teacher_before_converting(dense_models, corpus, tmp_path):
    output = tmp_path / "x"
    done = run_cli("upcycle", str(dense_models["llama"]), "--to", "moe", "--experts", "2", "-o", str(output), "--train",
                   "--data", str(corpus["train"]), "--teacher", str(tmp_path / "no-teacher"))
    assert "--teacher" in one_error_line(done) and not output.exists()


def test_a_whole_file_of_a_dtype_sparsify_does_not_convert_passes_the_truncation_check(tmp_path):
    import struct

    from sparsify.checkpoint_reader import check_weight_files

    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [4, 4], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    check_weight_files(tmp_path)  # whole: accepted, whatever the dtype
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(SparsifyError, match="is truncated"):
        check_weight_files(tmp_path)


def test_editing_the_config_after_conversion_withdraws_the_yes(dense_models, tmp_path):
    from sparsify.info import describe
    from sparsify.upcycle import upcycle

    folder = upcycle(str(dense_models["llama"]), "fine-moe", tmp_path / "fmoe", granularity=4).output
    assert describe(folder).reproduces_teacher.state == "yes"
    config = json.loads((folder / "config.json").read_text())
    config["num_experts_per_tok"] = 2  # top-2 of 4 partitions: no longer the dense FFN
    (folder / "config.json").write_text(json.dumps(config))
    verdict = describe(folder).reproduces_teacher
    assert verdict.state == "unknown" and "config.json changed" in verdict.reason


def test_every_command_reads_the_same_dtype_names_and_lists():
    from sparsify.option_values import dtype_name, parse_list

    assert [dtype_name(name) for name in ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32", "auto")] == [
        "bfloat16", "bfloat16", "float16", "float16", "float32", "float32", "auto"]
    EvalOptions(dtype="bfloat16", suite="cost").validate()  # eval used to accept only bf16/fp16/fp32
    with pytest.raises(SparsifyError, match="--precision must be auto or one of float32, fp32, bfloat16, bf16, got 'fp16'"):
        TrainOptions.of(data="x", precision="fp16").validate()
    assert parse_list(" a, b,,c ") == ["a", "b", "c"]
