"""Running recipes end to end on tiny models: every shipped recipe (with tiny-model overrides),
skipping finished stages, re-running changed ones, resuming an interrupted training run, and the
refusals that come before anything runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from sparsify.errors import SparsifyError
from sparsify.model_card import card_metadata_problems
from sparsify.recipe.recipe import load_recipe
from sparsify.recipe.runner import RecipeCallbacks, run_recipe
from support import sparsify_command

TRAIN = ["train.tokens=1536", "train.seq_len=32", "train.batch_size=4", "train.eval_tokens=512", "train.eval_every=0",
         "train.checkpoint_every=0", "train.lora_rank=4", "train.lora_alpha=8"]
EVAL = ["eval.tokens=256", "eval.window=32", "eval.stride=16", "eval.routing_tokens=128", "eval.speed_batch=1", "eval.prompt_len=8",
        "eval.decode_tokens=2", "eval.repeats=1", "eval.warmup=0", "eval.batch_size=2"]


def tiny(corpus, dense: Path, output: Path, *extra: str) -> list[str]:
    """The overrides that make a shipped SmolLM2 recipe a tiny-model recipe of the same shape."""
    return [f"model={dense}", f"output={output}", f"train.data={corpus['train']}", f"train.eval_data={corpus['valid']}",
            f"eval.teacher={dense}", f"eval.data={corpus['valid']}", f"eval.other_data={corpus['train']}", *TRAIN, *EVAL, *extra]


class Watch(RecipeCallbacks):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.ran: list[str] = []
        self.on_stage = lambda planned: self.ran.append(planned.section)


@pytest.fixture(scope="module")
def made(tmp_path_factory, corpus, dense_models) -> dict[str, Path]:
    """The three model recipes, run once on the tiny Llama."""
    root = tmp_path_factory.mktemp("recipes")
    outputs = {}
    for name in ("smollm2-fine-moe", "smollm2-moe", "smollm2-skip"):
        output = root / name
        run_recipe(load_recipe(name, tiny(corpus, dense_models["llama"], output)))
        outputs[name] = output
    return outputs


@pytest.mark.slow
def test_each_model_recipe_converts_trains_evaluates_and_records_its_recipe(made):
    for name, output in made.items():
        record = json.loads((output / "sparsify.json").read_text())
        assert record["recipe"]["name"] == name and len(record["training"]) == 1, name
        run_dir = output.with_name(output.name + ".run")
        state = json.loads((run_dir / "state.json").read_text())
        assert [s["status"] for s in state["stages"].values()] == ["done"] * 3
        assert (run_dir / "recipe.yaml").exists() and (run_dir / "eval" / "report.json").exists()
        assert (run_dir / "eval" / "other-domain" / "report.json").exists()
        report = json.loads((run_dir / "eval" / "report.json").read_text())
        assert report["quality"]["model"]["perplexity"] > 1 and report["quality"]["vs_teacher"]["kl"] >= 0
        card = ModelCard.load(output / "README.md")  # the held-out and the other-domain figures, and the recipe
        assert len({r.dataset_name for r in card.data.eval_results}) == 2 and "### Another domain" in card.text
        assert f"name: {name}" in card.text and card_metadata_problems(card.data.to_dict()) == []


@pytest.mark.slow
def test_the_evaluation_recipe_compares_several_models_against_one_teacher(made, corpus, dense_models, tmp_path):
    models = [str(dense_models["llama"]), *(str(p) for p in made.values())]
    recipe = load_recipe("eval-compare", [f"run_dir={tmp_path / 'run'}", f"eval.models=[{', '.join(models)}]", f"eval.teacher={dense_models['llama']}",
                                          f"eval.data={corpus['valid']}", f"eval.other_data={corpus['train']}", *EVAL, "eval.task_limit=4"])
    result = run_recipe(recipe)
    compare = (tmp_path / "run" / "eval" / "compare.md").read_text()
    assert compare.count("# sparsify compare") == 2  # held-out and other-domain text
    assert all(Path(m).name in compare for m in models) and "perplexity" in compare
    assert len(result.summaries["eval"]["reports"]) == 2 * len(models)
    report = json.loads(Path(result.summaries["eval"]["reports"][1]).read_text())
    assert report["tasks"]["model"] and report["routing"]


@pytest.mark.slow
def test_a_rerun_skips_finished_stages_and_reruns_a_changed_one_and_what_follows(tmp_path, corpus, dense_models):
    overrides = tiny(corpus, dense_models["llama"], tmp_path / "out", "~eval", "upcycle.granularity=4", "upcycle.top_k=2")
    first = Watch()
    run_recipe(load_recipe("smollm2-fine-moe", overrides), callbacks=first)
    assert first.ran == ["upcycle", "train"]
    again = Watch()
    result = run_recipe(load_recipe("smollm2-fine-moe", overrides), callbacks=again)
    assert again.ran == [] and [p.status for p in result.plan] == ["done", "done"]
    # A new evaluation stage runs alone; the trained model is not touched.
    weights = (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns
    evaluated = Watch()
    with_eval = [override for override in overrides if override != "~eval"]
    run_recipe(load_recipe("smollm2-fine-moe", [*with_eval, "eval.suite=quality", "~eval.other_data"]), callbacks=evaluated)
    assert evaluated.ran == ["eval"] and (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns == weights
    # Changed training settings: training rewrote the converted folder, so conversion runs again first.
    changed = Watch()
    run_recipe(load_recipe("smollm2-fine-moe", [*overrides, "train.lr=2e-3"]), callbacks=changed)
    assert changed.ran == ["upcycle", "train"]
    # No training at all any more: the folder must be the plain conversion again.
    untrained = Watch()
    run_recipe(load_recipe("smollm2-fine-moe", [*overrides, "~train"]), callbacks=untrained)
    assert untrained.ran == ["upcycle"] and "training" not in json.loads((tmp_path / "out" / "sparsify.json").read_text())


@pytest.mark.slow
def test_an_interrupted_training_stage_resumes_from_its_checkpoint(tmp_path, corpus, dense_models):
    overrides = tiny(corpus, dense_models["llama"], tmp_path / "out", "~eval", "upcycle.granularity=4", "upcycle.top_k=2",
                     "train.checkpoint_every=4", "train.tokens=2560")

    def stop_at_step_6(entry):
        if entry["step"] == 6:
            raise KeyboardInterrupt

    from sparsify.train.loop import TrainingInterrupted

    with pytest.raises(TrainingInterrupted):
        run_recipe(load_recipe("smollm2-fine-moe", overrides), callbacks=RecipeCallbacks(training={"on_step": stop_at_step_6}))
    state = json.loads((tmp_path / "out.run" / "state.json").read_text())
    assert state["stages"]["train"]["status"] == "running"
    trained = []
    resumed = run_recipe(load_recipe("smollm2-fine-moe", overrides), callbacks=RecipeCallbacks(on_trained=trained.append))
    assert [p.status for p in resumed.plan] == ["done", "resume"]
    assert trained[0].start_step == 4 and trained[0].steps == 20


def test_refusals_come_before_anything_runs(tmp_path, corpus, dense_models):
    taken = tmp_path / "taken"
    taken.mkdir()
    with pytest.raises(SparsifyError, match=r"output: .*taken already exists and was not made by this run"):
        run_recipe(load_recipe("smollm2-fine-moe", tiny(corpus, dense_models["llama"], taken)))
    absent = tmp_path / "absent"
    with pytest.raises(SparsifyError, match=r"the train stage reads the model folder .* which no earlier stage of this recipe makes"):
        run_recipe(load_recipe("smollm2-fine-moe", tiny(corpus, dense_models["llama"], absent, "~upcycle", f"model={tmp_path / 'gone'}")))
    assert not absent.exists() and not (tmp_path / "absent.run").exists()


def test_the_command_prints_the_plan_and_a_summary(tmp_path, corpus, dense_models):
    args = tiny(corpus, dense_models["llama"], tmp_path / "out", "~eval", "~train", "upcycle.granularity=4")
    done = subprocess.run([*sparsify_command(), "run", "smollm2-fine-moe", *args, "--validate"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "pending" in done.stdout and "valid" in done.stdout and not (tmp_path / "out").exists()
    done = subprocess.run([*sparsify_command(), "run", "smollm2-fine-moe", *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "recipe smollm2-fine-moe" in done.stdout and (tmp_path / "out" / "config.json").exists()
    again = subprocess.run([*sparsify_command(), "run", "smollm2-fine-moe", *args], capture_output=True, text=True, cwd=tmp_path)
    assert "skipped: done" in again.stdout


def test_a_run_folder_never_takes_an_existing_folder_it_did_not_write_as_its_output(tmp_path, corpus, dense_models):
    args = tiny(corpus, dense_models["llama"], tmp_path / "a", "~train", "~eval", "upcycle.granularity=4", f"run_dir={tmp_path / 'run'}")
    run_recipe(load_recipe("smollm2-fine-moe", args))
    foreign = tmp_path / "b"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SparsifyError, match=r"b already exists and was not made by this run"):
        run_recipe(load_recipe("smollm2-fine-moe", [*args, f"output={foreign}"]))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_a_recipe_without_upcycle_trains_model_into_output_once_and_never_in_place(tmp_path, corpus, dense_models):
    from sparsify.upcycle import upcycle

    converted = upcycle(str(dense_models["llama"]), "fine-moe", tmp_path / "converted", granularity=4, top_k=2).output
    before = (converted / "model.safetensors").read_bytes()
    args = [*tiny(corpus, dense_models["llama"], tmp_path / "trained", "~upcycle", "~eval"), f"model={converted}"]
    first, again = Watch(), Watch()
    run_recipe(load_recipe("smollm2-fine-moe", args), callbacks=first)
    run_recipe(load_recipe("smollm2-fine-moe", args), callbacks=again)
    assert (first.ran, again.ran) == (["train"], []) and (converted / "model.safetensors").read_bytes() == before
    assert json.loads((tmp_path / "trained" / "sparsify.json").read_text())["recipe"]["name"] == "smollm2-fine-moe"
    with pytest.raises(SparsifyError, match=r"without an upcycle stage, training reads 'model:' .* and writes 'output:', a different folder"):
        load_recipe("smollm2-fine-moe", [*args, f"output={converted}"])


def test_an_evaluation_recipe_never_writes_into_the_models_it_measures(tmp_path, corpus, dense_models):
    import shutil

    model = Path(shutil.copytree(dense_models["llama"], tmp_path / "dense"))
    before = sorted(p.name for p in model.iterdir())
    run_recipe(load_recipe("eval-compare", [f"run_dir={tmp_path / 'run'}", f"model={model}", "~eval.models", f"eval.teacher={model}",
                                            f"eval.data={corpus['valid']}", "eval.suite=quality", "~eval.other_data", "~eval.tasks",
                                            *EVAL]))
    assert sorted(p.name for p in model.iterdir()) == before and (tmp_path / "run" / "eval" / "report.json").exists()


def test_a_run_folder_holding_another_recipes_run_is_refused(tmp_path, corpus, dense_models):
    args = tiny(corpus, dense_models["llama"], tmp_path / "out", "~train", "~eval", "upcycle.granularity=4")
    run_recipe(load_recipe("smollm2-fine-moe", args))
    with pytest.raises(SparsifyError, match=r"out\.run holds a run of the recipe 'smollm2-fine-moe', not 'smollm2-moe'"):
        run_recipe(load_recipe("smollm2-moe", [*tiny(corpus, dense_models["llama"], tmp_path / "out", "~train", "~eval")]))


@pytest.mark.slow
def test_the_distill_recipe_upcycles_trains_the_experts_distills_and_measures_both(corpus, dense_models, tmp_path):
    moe, dense = tmp_path / "moe", tmp_path / "distilled"
    distill = [f"distill.output={dense}", f"distill.data={corpus['train']}", f"distill.eval_data={corpus['valid']}", "distill.tokens=512",
               "distill.seq_len=32", "distill.batch_size=4", "distill.eval_tokens=512", "distill.eval_every=0", "distill.lora_rank=4",
               "distill.calibration_tokens=2k", "distill.calibration_seq_len=64", f"distill.cache_teacher={tmp_path / 'cache'}",
               f"eval.models=[{dense}, {moe}]"]
    recipe = load_recipe("smollm2-distill", tiny(corpus, dense_models["llama"], moe, *distill))
    watch = Watch()
    run_recipe(recipe, callbacks=watch)
    assert watch.ran == ["upcycle", "train", "distill", "eval"]
    assert json.loads((dense / "config.json").read_text())["model_type"] == "llama"
    record = json.loads((dense / "distill.json").read_text())
    assert record["teacher"] == str(moe) and record["init"]["init"] == "merge" and record["training"]["tokens"] == 512
    compare = json.loads((moe.with_name(moe.name + ".run") / "eval" / "compare.json").read_text())
    assert compare["models"] == [str(dense), str(moe)] and len(compare["reports"]) == 4  # held-out and other domain, each model
    again = Watch()
    run_recipe(load_recipe("smollm2-distill", tiny(corpus, dense_models["llama"], moe, *distill)), callbacks=again)
    assert again.ran == []  # every stage finished with the same settings


@pytest.mark.slow
def test_the_mot_recipe_converts_trains_transitions_and_measures_both(corpus, dense_models, tmp_path):
    mot, moe = tmp_path / "mot", tmp_path / "moe"
    extra = [f"transition.output={moe}", f"transition.data={corpus['train']}", f"transition.eval_data={corpus['valid']}",
             "transition.tokens=512", "transition.seq_len=32", "transition.batch_size=4", "transition.eval_tokens=512",
             "transition.eval_every=0", "transition.lora_rank=4", "upcycle.experts=4", f"upcycle.calibration_data={corpus['train']}",
             "upcycle.calibration_tokens=2k", "upcycle.calibration_seq_len=64", f"eval.models=[{moe}, {mot}]"]
    recipe = load_recipe("smollm2-mot", tiny(corpus, dense_models["llama"], mot, *extra))
    watch = Watch()
    run_recipe(recipe, callbacks=watch)
    assert watch.ran == ["upcycle", "train", "transition", "eval"]
    assert json.loads((mot / "config.json").read_text())["mot_layers"] == [1]  # the later half of the tiny model's 2
    assert json.loads((mot / "sparsify.json").read_text())["layout"]["controller_init"] == "data"
    config = json.loads((moe / "config.json").read_text())
    # Partly MoT: Qwen2-MoE with layer 0 dense; top-k = 4 experts / G 2.
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["mlp_only_layers"] == [0] and config["num_experts_per_tok"] == 2
    compare = json.loads((mot.with_name(mot.name + ".run") / "eval" / "compare.json").read_text())
    assert compare["models"] == [str(moe), str(mot)] and len(compare["reports"]) == 4
    again = Watch()
    run_recipe(load_recipe("smollm2-mot", tiny(corpus, dense_models["llama"], mot, *extra)), callbacks=again)
    assert again.ran == []
