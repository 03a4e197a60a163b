"""Reading recipes: the shipped ones validate, keys and types are checked against the option
dataclasses with the file and line, overrides behave like the file, and tokens are refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from sparsify.errors import SparsifyError
from sparsify.recipe.recipe import load_recipe
from sparsify.recipe.shipped import shipped
from support import sparsify_command

SHARED = Path(__file__).resolve().parents[3] / "shared"


@pytest.fixture
def beside_shared(tmp_path, monkeypatch):
    """A working folder from which the shipped recipes' ../shared/data paths resolve."""
    if not (SHARED / "data" / "corpus" / "train.jsonl.gz").exists():
        pytest.skip("../shared/data is not here")
    (tmp_path / "shared").symlink_to(SHARED)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "work"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


BASE = """\
model: smollm2-135m
output: out/x
upcycle:
  to: fine-moe
  granularity: 4
train:
  data: {data: DATA, tokens: 2M}
  optimisation:
    lr: 3e-4
"""


@pytest.fixture
def base(tmp_path, corpus) -> Path:
    return write(tmp_path, BASE.replace("DATA", str(corpus["train"])))


def test_every_shipped_recipe_validates(beside_shared):
    assert set(shipped()) >= {"smollm2-fine-moe", "smollm2-moe", "smollm2-skip", "eval-compare"}
    for name in shipped():
        recipe = load_recipe(name)
        assert recipe.stages, name
        again = load_recipe(write(beside_shared, recipe.resolved_yaml()))  # what the run folder keeps reads back the same
        assert again.resolved() == recipe.resolved()


def test_the_fine_moe_recipe_is_g8_top4_trained_and_evaluated_on_held_out_and_other_domain_text(beside_shared):
    resolved = load_recipe("smollm2-fine-moe").resolved()
    assert (resolved["upcycle"]["to"], resolved["upcycle"]["granularity"], resolved["upcycle"]["top_k"]) == ("fine-moe", 8, 4)
    assert "valid" in resolved["eval"]["data"] and "ood-git-doc" in resolved["eval"]["other_data"]
    assert "valid" not in resolved["train"]["data"]["data"] and not resolved["train"]["data"]["eval_data"]  # tuned on train only


def test_values_take_the_type_of_their_field_not_yamls(base):
    recipe = load_recipe(base)
    assert recipe.stages["train"].optimisation.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string
    assert recipe.stages["upcycle"].options.granularity == 4
    assert recipe.stages["upcycle"].options.top_k is None  # fine-moe's default: G


def test_an_unknown_key_names_the_file_the_line_and_the_nearest_key(base):
    base.write_text(base.read_text().replace("    lr: 3e-4", "    lrr: 3e-4"))
    with pytest.raises(SparsifyError, match=r"recipe\.yaml:9: unknown key 'train\.optimisation\.lrr'; did you mean 'lr'\?"):
        load_recipe(base)


def test_a_wrong_type_names_the_file_and_line(base):
    base.write_text(base.read_text().replace("granularity: 4", "granularity: four"))
    with pytest.raises(SparsifyError, match=r"recipe\.yaml:5: 'upcycle\.granularity' needs a whole number, not 'four'"):
        load_recipe(base)


def test_an_option_of_another_variant_is_refused_as_such(base):
    base.write_text(base.read_text().replace("granularity: 4", "gates: both"))
    with pytest.raises(SparsifyError, match=r"recipe\.yaml:5: 'upcycle\.gates' does not apply to 'to: fine-moe'"):
        load_recipe(base)


def test_another_variants_training_group_is_refused(base):
    with pytest.raises(SparsifyError, match=r"'train\.skip' is for the variant whose training group is 'skip'.*fine-moe"):
        load_recipe(base, ["train.skip.skip_weight=1"])


def test_option_checks_of_the_dataclasses_apply_with_the_position(base):
    with pytest.raises(SparsifyError, match=r"command line 'upcycle\.top_k=9': top-k 9 must be between 1 and the number of experts, 4"):
        load_recipe(base, ["upcycle.top_k=9"])
    with pytest.raises(SparsifyError, match=r"command line 'train\.lr=0': --lr 0.0: must be greater than 0"):
        load_recipe(base, ["train.lr=0"])
    base.write_text(base.read_text().replace("lr: 3e-4", "lr: -1"))
    with pytest.raises(SparsifyError, match=r"recipe\.yaml:9: --lr -1.0: must be greater than 0"):  # the key's own line
        load_recipe(base)


def test_overrides_set_dotted_keys_flat_or_grouped_and_remove_stages(base, corpus):
    recipe = load_recipe(base, ["train.tokens=3M", "train.optimisation.batch_size=2", "~upcycle",
                                f"eval.data={corpus['valid']}", "eval.suite=[quality, routing]"])
    assert recipe.stages["train"].data.tokens == "3M" and recipe.stages["train"].optimisation.batch_size == 2
    assert "upcycle" not in recipe.stages and recipe.stages["eval"].options.suite == "quality,routing"
    assert list(recipe.stages) == ["train", "eval"]


def test_an_override_of_an_unknown_key_is_refused_naming_the_override(base):
    with pytest.raises(SparsifyError, match=r"command line 'train\.tokenz=2M': unknown key 'train\.tokenz'; did you mean 'tokens'\?"):
        load_recipe(base, ["train.tokenz=2M"])
    with pytest.raises(SparsifyError, match=r"command line '~push': the recipe has no 'push' to remove"):
        load_recipe(base, ["~push"])
    with pytest.raises(SparsifyError, match=r"an override is KEY=VALUE"):
        load_recipe(base, ["train.tokens"])


def test_yaml_errors_missing_files_and_duplicate_keys_are_one_line_each(tmp_path, base):
    with pytest.raises(SparsifyError, match=r"recipe .*nope\.yaml not found; `sparsify recipes list`"):
        load_recipe(tmp_path / "nope.yaml")
    bad = write(tmp_path, "model: x\nupcycle:\n  to: moe\n   experts: 2\n")
    with pytest.raises(SparsifyError, match=r"recipe\.yaml:4: YAML syntax error"):
        load_recipe(bad)
    twice = write(tmp_path, "model: x\noutput: y\nupcycle: {to: moe}\nmodel: z\n")
    with pytest.raises(SparsifyError, match=r"recipe\.yaml:4: 'model' is given twice \(first at .*recipe\.yaml:1\)"):
        load_recipe(twice)
    with pytest.raises(SparsifyError, match=r"no recipe file or shipped recipe named 'smollm2-fine-mo'; did you mean 'smollm2-fine-moe'\?"):
        load_recipe("smollm2-fine-mo")


def test_a_token_in_a_recipe_is_refused(base):
    with pytest.raises(SparsifyError, match=r"'push\.token': a token never goes in a recipe .*HF_TOKEN"):
        load_recipe(base, ["push.repo_id=me/x", "push.token=abc"])
    with pytest.raises(SparsifyError, match=r"looks like a Hugging Face token"):
        load_recipe(base, ["push.repo_id=hf_" + "a1B2" * 9])


def test_a_stage_without_what_it_needs_is_refused(tmp_path):
    with pytest.raises(SparsifyError, match=r"the upcycle stage needs 'model:' .* and 'output:'"):
        load_recipe(write(tmp_path, "upcycle: {to: moe}\n"))
    with pytest.raises(SparsifyError, match=r"'upcycle' needs 'to'"):
        load_recipe(write(tmp_path, "model: x\noutput: y\nupcycle: {experts: 2}\n"))
    with pytest.raises(SparsifyError, match=r"push needs a repo_id"):
        load_recipe(write(tmp_path, "model: x\npush: {private: true}\n"))


def test_print_config_shows_every_default_and_runs_nothing(base, tmp_path):
    done = subprocess.run([*sparsify_command(), "run", str(base), "train.lora.lora_rank=8", "--print-config"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["train"]["lora"]["lora_rank"] == 8 and resolved["train"]["optimisation"]["warmup"] == 0.05
    # split's default depends on --calibration-data (coactivation with it, contiguous without): shown as unset
    assert resolved["upcycle"]["split"] is None and "skip" not in resolved["train"]
    assert not (tmp_path / "out").exists()


def test_the_command_line_reports_a_bad_recipe_in_one_line(base, tmp_path):
    done = subprocess.run([*sparsify_command(), "run", str(base), "train.optimisation.lrr=1"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "did you mean 'lr'" in done.stderr


def test_recipes_list_and_show(tmp_path):
    listed = subprocess.run([*sparsify_command(), "recipes", "list"], capture_output=True, text=True, cwd=tmp_path)
    assert listed.returncode == 0 and all(name in listed.stdout for name in shipped())
    shown = subprocess.run([*sparsify_command(), "recipes", "show", "smollm2-moe"], capture_output=True, text=True, cwd=tmp_path)
    assert shown.stdout == shipped()["smollm2-moe"].read_text()


def test_a_single_value_for_the_data_group_sets_its_data_and_keeps_its_other_keys(base, corpus):
    recipe = load_recipe(base, [f"train.data={corpus['valid']}"])
    assert recipe.stages["train"].data.data == str(corpus["valid"]) and recipe.stages["train"].data.tokens == "2M"


def test_an_option_written_flat_and_in_its_group_is_refused_unless_the_command_line_sets_it(base):
    base.write_text(base.read_text() + "  lr: 1e-3\n")
    with pytest.raises(SparsifyError, match=r"recipe\.yaml:10: 'train' sets 'lr' twice \(also at .*recipe\.yaml:9\); keep one"):
        load_recipe(base)
    base.write_text(base.read_text().replace("  lr: 1e-3\n", "  batch_size: 2\n"))
    assert load_recipe(base, ["train.optimisation.batch_size=3"]).stages["train"].optimisation.batch_size == 3
    assert load_recipe(base, ["train.lr=5e-3"]).stages["train"].optimisation.lr == 5e-3


def test_numbers_are_read_exactly_and_infinities_refused(base):
    assert load_recipe(base, ["train.train_seed=12345678901234567890123"]).stages["train"].optimisation.train_seed == 12345678901234567890123
    assert load_recipe(base, ["train.eval_every=1e3"]).stages["train"].run.eval_every == 1000
    with pytest.raises(SparsifyError, match=r"'train\.lr' needs a number \(or null\), not 'inf'"):
        load_recipe(base, ["train.lr=inf"])


def test_a_bad_evaluation_teacher_is_refused_when_the_recipe_is_read(base, corpus):
    with pytest.raises(SparsifyError, match=r"command line 'eval\.teacher=/no/such/model': eval\.teacher /no/such/model: no such folder"):
        load_recipe(base, [f"eval.data={corpus['valid']}", "eval.teacher=/no/such/model"])


def test_a_token_given_on_the_command_line_is_never_echoed(base, tmp_path):
    token = "hf_" + "Zy9x" * 9
    for override in (f"push.token={token}", f"HF_TOKEN={token}", f"push.repo_id={token}"):
        done = subprocess.run([*sparsify_command(), "run", str(base), "push.private=true", override, "--print-config"],
                              capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 1 and token not in done.stdout + done.stderr and "token" in done.stderr, override


def test_a_commit_message_in_brackets_stays_text(base):
    recipe = load_recipe(base, ["push.repo_id=me/x", "push.commit_message=[WIP] first try"])
    assert recipe.stages["push"].commit_message == "[WIP] first try"
