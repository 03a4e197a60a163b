"""The model card as the Hub reads it: metadata that huggingface_hub parses (license inherited from the
source, base model and relation, training datasets, tags, model-index from a real eval report), a
usage snippet right for the variant, the recipe, and no rule of the Hub's broken; re-rendered from
the folder's files alone."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard

from sparsify.eval.options import EvalOptions
from sparsify.eval.run import evaluate
from sparsify.model_card import EVAL_FOLDER, card_metadata_problems, refresh_card
from sparsify.provenance import describe_gguf, read_record, write_record
from sparsify.upcycle import upcycle

VARIANTS = {"moe": dict(experts=2, top_k=1), "fine-moe": dict(granularity=4, experts=2), "skip": {}}
FAKE_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"
RECIPE = {"model": "tiny-org/tiny-llama", "to": "fine-moe", "upcycle": {"granularity": 4},
          "train": {"data": "HuggingFaceFW/fineweb-edu", "tokens": "5M"}, "push": {"repo": "me/tiny-fine-moe", "hub_token": FAKE_TOKEN}}


@pytest.fixture(scope="module")
def licensed_source(dense_models, tmp_path_factory) -> Path:
    """A dense folder whose own card declares apache-2.0, as a Hub model's README does."""
    folder = tmp_path_factory.mktemp("licensed") / "dense"
    shutil.copytree(dense_models["llama"], folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n\n# A dense model\n")
    return folder


@pytest.fixture(scope="module")
def converted(licensed_source, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("converted")
    return {name: upcycle(str(licensed_source), name, folder / name, command=f"sparsify upcycle dense --to {name}", **options).output
            for name, options in VARIANTS.items()}


def _eval_options(teacher: Path, data: Path) -> EvalOptions:
    return EvalOptions(teacher=str(teacher), data=str(data), suite="quality,routing,cost", tokens="384", window=64, stride=32,
                       batch_size=2, routing_tokens="256", speed_batch="1", prompt_len=8, decode_tokens=2, warmup=0, repeats=3, device="cpu")


@pytest.fixture(scope="module")
def evaluated(converted, licensed_source, corpus, tmp_path_factory) -> dict[str, Path]:
    """Each variant's folder after `sparsify eval MODEL --teacher DENSE --card` (the real code path)."""
    folder = tmp_path_factory.mktemp("evaluated")
    done = {}
    for name, source in converted.items():
        shutil.copytree(source, folder / name)
        evaluate(str(folder / name), _eval_options(licensed_source, corpus["valid"]), card=True)
        done[name] = folder / name
    return done


def _card(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def _with_record(folder: Path, **changes) -> Path:
    write_record(folder, {**read_record(folder), **changes})
    refresh_card(folder)
    return folder


# --- the metadata the Hub reads -----------------------------------------------------------------


@pytest.mark.parametrize("recipe", [False, True], ids=["no-recipe", "recipe"])
@pytest.mark.parametrize("with_report", [False, True], ids=["no-report", "report"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_card_parses_on_the_hub_and_breaks_no_metadata_rule(converted, evaluated, tmp_path, variant, with_report, recipe):
    folder = tmp_path / variant
    shutil.copytree((evaluated if with_report else converted)[variant], folder)
    if recipe:
        _with_record(folder, recipe=RECIPE)
    card = _card(folder)
    meta = card.data.to_dict()
    assert card_metadata_problems(meta) == []
    assert (meta["library_name"], meta["pipeline_tag"], meta["license"]) == ("transformers", "text-generation", "apache-2.0")
    assert "base_model" not in meta  # a local folder without a Hub id: no parent is guessed
    assert "sparsify" in meta["tags"]
    assert {"skip": {"layer-skip", "custom_code"}, "moe": {"moe", "mixture-of-experts"},
            "fine-moe": {"moe", "mixture-of-experts", "fine-grained-moe"}}[variant] <= set(meta["tags"])
    assert ("custom_code" in meta["tags"]) == (variant == "skip")
    assert bool(card.data.eval_results) == with_report and ("## Evaluation" in card.text) == with_report
    assert ("## Recipe" in card.text) == recipe


def test_the_license_is_inherited_from_the_source_card_and_omitted_when_the_source_has_none(converted, dense_models, tmp_path):
    assert read_record(converted["moe"])["source"]["license"] == "apache-2.0"
    assert "License: `apache-2.0`, inherited from the source (its model card)." in _card(converted["moe"]).text
    unlicensed = upcycle(str(dense_models["llama"]), "moe", tmp_path / "moe", experts=2, top_k=1).output
    card = _card(unlicensed)
    assert "license" not in read_record(unlicensed)["source"] and card.data.license is None
    assert "license:" not in card.content.split("---")[1]
    assert "declares no license" in card.text and card_metadata_problems(card.data.to_dict()) == []


def test_a_gguf_source_license_comes_from_its_general_license_key(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "tiny.gguf", "llama")
    writer.add_license("mit")
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    assert describe_gguf(tmp_path / "tiny.gguf")["license"] == "mit"


def test_the_real_smollm2_gguf_declares_apache_2_0():
    from sparsify.aliases import ALIASES

    assert describe_gguf(ALIASES["smollm2-135m"].path())["license"] == "apache-2.0"


@pytest.mark.slow
def test_the_real_gguf_card_inherits_apache_2_0_and_is_a_finetune_of_the_hub_model(tmp_path):
    card = _card(upcycle("smollm2-135m", "skip", tmp_path / "skip").output)
    meta = card.data.to_dict()
    assert (meta["license"], meta["base_model"], meta["base_model_relation"]) == (
        "apache-2.0", "HuggingFaceTB/SmolLM2-135M-Instruct", "finetune")
    assert "inherited from the source (its GGUF metadata)" in card.text and card_metadata_problems(meta) == []


def test_a_hub_source_is_the_base_model_a_finetune_with_its_revision_in_the_text_and_its_license(dense_models, tmp_path, monkeypatch):
    """The snapshot_download code path, served offline from a Hub cache laid out on disk (as in test_vanilla_loading)."""
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / commit
    shutil.copytree(dense_models["llama"], snapshot)
    (snapshot / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n")
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text(commit)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    output = upcycle("tiny-org/tiny-llama", "fine-moe", tmp_path / "out", granularity=4).output
    card = _card(output)
    meta = card.data.to_dict()
    assert (meta["base_model"], meta["base_model_relation"]) == ("tiny-org/tiny-llama", "finetune")
    assert (meta["license"], meta["license_name"]) == ("other", "tiny-license")
    assert meta["license_link"] == f"https://huggingface.co/tiny-org/tiny-llama/blob/{commit}/LICENSE"  # not this repo's LICENSE
    assert f"at revision `{commit}`" in card.text and card_metadata_problems(meta) == []


def test_datasets_lists_hub_ids_and_the_text_names_local_files(converted, corpus, tmp_path):
    folder = tmp_path / "trained"
    shutil.copytree(converted["fine-moe"], folder)
    training = {"steps": 3, "tokens": 1536, "command": "sparsify train out --data ...",
                "options": {"data": f"HuggingFaceFW/fineweb-edu,{corpus['train']},data/*.jsonl", "teacher": "self"},
                "before": {"student_ppl": 20.0, "teacher_ppl": 20.0, "kl": 0.0, "top1_agreement": 1.0},
                "after": {"student_ppl": 21.0, "teacher_ppl": 20.0, "kl": 0.01, "top1_agreement": 0.9}}
    card = _card(_with_record(folder, training=[training]))
    assert card.data.datasets == ["HuggingFaceFW/fineweb-edu"]
    assert "on 1,536 tokens of [`HuggingFaceFW/fineweb-edu`](https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu), " \
           "the local file `train.jsonl.gz`, the local file `*.jsonl`:" in card.text
    assert str(corpus["train"].parent) not in card.content.split("## How it was made")[0]


# --- evaluation results ---------------------------------------------------------------------------


def test_the_model_index_holds_the_reports_figures_as_numbers_on_the_held_out_file(evaluated):
    folder = evaluated["fine-moe"]
    report = json.loads((folder / EVAL_FOLDER / "report.json").read_text())
    card = _card(folder)
    results = {r.metric_type: r for r in card.data.eval_results}
    assert {"perplexity", "bits_per_byte", "kl_divergence", "top1_agreement"} <= set(results)
    quality = report["quality"]
    assert results["perplexity"].metric_value == pytest.approx(quality["model"]["perplexity"], rel=1e-5)
    assert results["kl_divergence"].metric_value == pytest.approx(quality["vs_teacher"]["kl"], rel=1e-5, abs=1e-9)
    assert results["top1_agreement"].metric_value == pytest.approx(quality["vs_teacher"]["top1_agreement"], rel=1e-5)
    for result in card.data.eval_results:
        assert result.task_type == "text-generation" and isinstance(result.metric_value, float)
        assert (result.dataset_type, result.dataset_name) == ("valid.jsonl.gz", "held-out text: valid.jsonl.gz")
    # Speed ratios, where both sides' timings are results, are the medians' ratio.
    for result in (r for r in card.data.eval_results if r.metric_type == "speedup"):
        assert result.metric_value > 0 and result.metric_name.endswith(": model / teacher")
    assert "| perplexity |" in card.text and card.text.count("<!-- sparsify-eval:begin -->") == 1


def test_card_eval_stores_the_report_with_its_plots_in_the_folder_and_a_second_eval_replaces_it(evaluated, licensed_source, corpus, tmp_path):
    folder = tmp_path / "moe"
    shutil.copytree(evaluated["moe"], folder)
    stored = folder / EVAL_FOLDER
    assert {"report.json", "report.md", "routing_load.png"} <= {p.name for p in stored.iterdir()}
    assert "routing_load.png" in (stored / "report.md").read_text()
    (stored / "stale.png").write_bytes(b"old")
    options = _eval_options(licensed_source, corpus["valid"])
    options.suite = "quality"
    evaluate(str(folder), options, card=True)
    assert {p.name for p in stored.iterdir()} == {"report.json", "report.md"}
    card = _card(folder)
    assert card.data.eval_results and "### Cost" not in card.text and card_metadata_problems(card.data.to_dict()) == []


# --- the body -----------------------------------------------------------------------------------


def test_the_snippet_trusts_remote_code_only_for_skip_and_names_the_repo_when_known(converted, tmp_path):
    for variant, source in converted.items():
        folder = tmp_path / variant
        shutil.copytree(source, folder)
        unknown = _card(folder).text
        assert 'from_pretrained("path/or/repo"' in unknown
        assert ("trust_remote_code=True)" in unknown) == (variant == "skip")
        refresh_card(folder, repo_id=f"me/tiny-{variant}")
        known = _card(folder)
        assert f'AutoModelForCausalLM.from_pretrained("me/tiny-{variant}"' in known.text and "path/or/repo" not in known.text
        assert card_metadata_problems(known.data.to_dict()) == []


def test_the_recipe_is_shown_as_yaml_without_credentials_and_no_token_reaches_the_card(converted, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    folder = tmp_path / "fine-moe"
    shutil.copytree(converted["fine-moe"], folder)
    _with_record(folder, recipe=RECIPE, command=f"sparsify run recipe.yaml --set push.hub_token={FAKE_TOKEN}")
    text = (folder / "README.md").read_text()
    recipe = text.split("## Recipe")[1].split("```yaml\n")[1].split("\n```")[0]
    assert "upcycle:\n  granularity: 4\n" in recipe and "hub_token: <redacted>" in recipe and "tokens: 5M" in recipe
    assert FAKE_TOKEN not in text and "hf_<redacted>" in text


def test_refresh_leaves_a_folder_sparsify_did_not_write_alone(dense_models, tmp_path):
    folder = tmp_path / "dense"
    shutil.copytree(dense_models["llama"], folder)
    (folder / "README.md").write_text("# mine\n")
    assert refresh_card(folder) == folder / "README.md" and (folder / "README.md").read_text() == "# mine\n"


# --- the rules, one by one ------------------------------------------------------------------------


GOOD = {"library_name": "transformers", "pipeline_tag": "text-generation", "license": "apache-2.0", "base_model": "org/model",
        "base_model_relation": "finetune", "datasets": ["org/data"], "tags": ["sparsify"],
        "model-index": [{"name": "m", "results": [{"task": {"type": "text-generation"}, "dataset": {"type": "d", "name": "d"},
                                                    "metrics": [{"type": "perplexity", "value": 12.5}]}]}]}


@pytest.mark.parametrize("change,problem", [
    ({"base_model_relation": "distilled"}, "'distilled' is not one the Hub knows"),
    ({"base_model": None}, "given without a base_model"),
    ({"base_model": ["a/b", "c/d"]}, "'finetune' has one parent, but base_model lists 2"),
    ({"base_model": "./my/model"}, "base_model: './my/model' is not a Hub model id"),
    ({"license": "apache"}, "license: 'apache' is not a Hub license identifier"),
    ({"license": "other"}, "`other` needs a license_name"),
    ({"license_name": "mine"}, "only read with `license: other`"),
    ({"datasets": ["org/data", "data/train.jsonl.gz"]}, "datasets: 'data/train.jsonl.gz' is not a Hub dataset id"),
    ({"datasets": ["/home/me/corpus"]}, "datasets: '/home/me/corpus' is not a Hub dataset id"),
    ({"tags": ["ok", 3]}, "every tag must be a string"),
    ({"pipeline_tag": ["text-generation"]}, "pipeline_tag: must be one string"),
    ({"model-index": [{"name": "m", "results": [{"task": {}, "dataset": {"type": "d", "name": "d"}, "metrics": []}]}]},
     "huggingface_hub cannot parse it (KeyError"),
    ({"model-index": [{"name": "m", "results": []}]}, "model-index: has no results"),
    ({"model-index": [{"name": "m", "results": [{"task": {"type": "text-generation"}, "dataset": {"type": "d", "name": "d"},
                                                 "metrics": [{"type": "perplexity", "value": "12.5 (teacher 11)"}]}]}]},
     "metric 'perplexity' has the value '12.5 (teacher 11)', not a number"),
    ({"tags": ["sparsify", FAKE_TOKEN]}, "looks like a Hugging Face access token"),
])
def test_each_broken_rule_is_named(change, problem):
    assert card_metadata_problems(GOOD) == []
    meta = {key: value for key, value in {**GOOD, **change}.items() if value is not None}
    problems = card_metadata_problems(meta)
    assert len(problems) == 1 and problem in problems[0], problems


def test_an_other_domain_report_adds_its_quality_to_the_model_index_and_the_card(evaluated, licensed_source, corpus, tmp_path):
    from sparsify.model_card import OTHER_DOMAIN

    folder = Path(shutil.copytree(evaluated["fine-moe"], tmp_path / "fmoe"))
    evaluate(str(folder), replace(_eval_options(licensed_source, corpus["train"]), suite="quality"), output=tmp_path / "other")
    (folder / EVAL_FOLDER / OTHER_DOMAIN).mkdir()
    shutil.copyfile(tmp_path / "other" / "report.json", folder / EVAL_FOLDER / OTHER_DOMAIN / "report.json")
    refresh_card(folder)
    card = _card(folder)
    by_data = {r.dataset_name for r in card.data.eval_results if r.metric_type == "perplexity"}
    assert by_data == {"held-out text: valid.jsonl.gz", "held-out text: train.jsonl.gz"}
    assert "### Another domain" in card.text and card_metadata_problems(card.data.to_dict()) == []
    front_matter = (folder / "README.md").read_text().split("---")[1]
    assert "&id" not in front_matter and "*id" not in front_matter  # plain YAML: no anchors or aliases
