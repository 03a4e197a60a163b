"""`sparsify push`, `--push-to-hub` and a recipe's push stage against the test Hub
(tests/hub_server.py), driven by the real huggingface_hub client over HTTP."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sparsify.errors import SparsifyError
from sparsify.hub import PushOptions, push
from sparsify.upcycle import upcycle
from hub_server import ALICE_READ_TOKEN, ALICE_TOKEN
from support import IDS, sparsify_command


@pytest.fixture(scope="module")
def converted(tmp_path_factory, dense_models) -> Path:
    folder = tmp_path_factory.mktemp("push") / "fmoe"
    return upcycle(str(dense_models["llama"]), "fine-moe", folder, granularity=4, top_k=2).output


@pytest.fixture
def folder(converted, tmp_path) -> Path:
    """A copy each test may push (the push rewrites its card for the repository)."""
    return Path(shutil.copytree(converted, tmp_path / "fmoe"))


def digests(folder: Path, leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in leave_out}


def run_sparsify(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*sparsify_command(), *args], capture_output=True, text=True, env={**env, "COLUMNS": "200"}, cwd=cwd,
                          timeout=600)


def everything_written(*roots: Path) -> str:
    return "".join(p.read_text(errors="replace") for root in roots if root.exists() for p in root.rglob("*") if p.is_file())


def test_a_pushed_model_downloads_and_gives_the_same_logits_and_its_card_reads_back(hub, folder, tmp_path):
    from huggingface_hub import ModelCard, snapshot_download
    from transformers import AutoModelForCausalLM

    hub.login()
    result = push(folder, PushOptions(repo_id="alice/fmoe"))
    assert result.changed and hub.server.repos["alice/fmoe"].private
    downloaded = snapshot_download("alice/fmoe", cache_dir=tmp_path / "cache")
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder).eval()(IDS).logits
        got = AutoModelForCausalLM.from_pretrained(downloaded).eval()(IDS).logits
    assert torch.equal(expected, got)
    card = ModelCard.load("alice/fmoe")
    assert card.data.library_name == "transformers" and "sparsify" in card.data.tags
    assert 'from_pretrained("alice/fmoe")' in card.text and "trust_remote_code" not in card.text


def test_a_repush_of_an_unchanged_folder_makes_no_commit(hub, folder):
    hub.login()
    first = push(folder, PushOptions(repo_id="alice/fmoe"))
    commits = len(hub.server.commits["alice/fmoe"])
    again = push(folder, PushOptions(repo_id="alice/fmoe"))
    assert not again.changed and again.commit == first.commit and len(hub.server.commits["alice/fmoe"]) == commits


def test_run_folders_checkpoints_tokenized_data_and_hidden_files_are_never_uploaded(hub, folder):
    for junk in ("x.run/log.jsonl", "x.run/checkpoint/state.pt", "checkpoint/adapters.safetensors", "data/train.tokens",
                 ".cache/note", ".staging.partial-1234/config.json"):
        (folder / junk).parent.mkdir(parents=True, exist_ok=True)
        (folder / junk).write_text("junk")
    hub.login()
    push(folder, PushOptions(repo_id="alice/fmoe"))
    uploaded = set(hub.server.files("alice/fmoe"))
    assert {"config.json", "model.safetensors", "README.md", "sparsify.json", "tokenizer.json"} <= uploaded
    assert not [path for path in uploaded if "run" in path.split("/")[0] or "checkpoint" in path or path.endswith(".tokens")
                or path.startswith(".") and path != ".gitattributes"]


def test_without_a_token_nothing_is_created(hub, folder):
    with pytest.raises(SparsifyError, match=r"no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        push(folder, PushOptions(repo_id="alice/fmoe"))
    assert hub.server.count("create-repo") == 0


def test_a_namespace_the_token_cannot_write_and_a_read_only_token_are_refused_before_anything_is_created(hub, folder):
    hub.login()
    with pytest.raises(SparsifyError, match=r"the token \(user alice\) cannot write to the namespace 'bob'; push to .*alice/fmoe"):
        push(folder, PushOptions(repo_id="bob/fmoe"))
    hub.login(ALICE_READ_TOKEN)
    with pytest.raises(SparsifyError, match=r"read-only"):
        push(folder, PushOptions(repo_id="alice/fmoe"))
    hub.login("hf_not_a_token_of_anyone")
    with pytest.raises(SparsifyError, match=r"the Hub refused the token \(401\)"):
        push(folder, PushOptions(repo_id="alice/fmoe"))
    assert hub.server.count("create-repo") == 0


def test_a_server_failure_mid_upload_leaves_the_folder_untouched_and_says_to_rerun(hub, folder):
    hub.login()
    push(folder, PushOptions(repo_id="alice/fmoe"))  # the card now names the repository
    (folder / "extra.json").write_text("{}")
    before = digests(folder)
    hub.server.fail("commit", times=1)
    with pytest.raises(SparsifyError, match=r"the upload to alice/fmoe failed .* is unchanged: re-run the push"):
        push(folder, PushOptions(repo_id="alice/fmoe"))
    assert digests(folder) == before and "extra.json" not in hub.server.files("alice/fmoe")
    assert push(folder, PushOptions(repo_id="alice/fmoe")).changed and "extra.json" in hub.server.files("alice/fmoe")


def test_the_push_command_keeps_the_token_out_of_its_output_and_the_folder(hub, folder, tmp_path):
    done = run_sparsify("push", str(folder), "alice/cli-fmoe", "--public", "--revision", "v1", "--commit-message", "tiny fmoe",
                        env=hub.env(token=True), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "pushed" in done.stdout and not hub.server.repos["alice/cli-fmoe"].private
    assert hub.server.commits["alice/cli-fmoe"][-1].title == "tiny fmoe" and "config.json" in hub.server.files("alice/cli-fmoe", "v1")
    assert ALICE_TOKEN not in done.stdout + done.stderr + everything_written(folder)
    refused = run_sparsify("push", str(folder), "alice/other", env=hub.env(token=False, home=tmp_path / "empty"), cwd=tmp_path)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 1 and len(lines) == 1 and "HF_TOKEN" in lines[0]


def test_upcycle_push_to_hub_checks_the_namespace_before_converting_and_cards_the_hub_source(hub, dense_models, tmp_path):
    from huggingface_hub import HfApi, ModelCard

    source = tmp_path / "dense"
    shutil.copytree(dense_models["llama"], source)
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a dense model\n")
    api = HfApi(token=ALICE_TOKEN)
    api.create_repo("alice/dense", private=True)
    api.upload_folder(folder_path=source, repo_id="alice/dense")

    refused = run_sparsify("upcycle", "alice/dense", "--to", "moe", "--experts", "2", "-o", str(tmp_path / "no"),
                           "--push-to-hub", "bob/moe", env=hub.env(token=True), cwd=tmp_path)
    assert refused.returncode == 1 and "cannot write to the namespace 'bob'" in refused.stderr and not (tmp_path / "no").exists()

    done = run_sparsify("upcycle", "alice/dense", "--to", "moe", "--experts", "2", "--top-k", "1", "-o", str(tmp_path / "moe"),
                        "--push-to-hub", "alice/moe", env=hub.env(token=True), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    hub.login()
    card = ModelCard.load("alice/moe")
    assert (card.data.base_model, card.data.base_model_relation, card.data.license) == ("alice/dense", "finetune", "apache-2.0")
    assert ALICE_TOKEN not in done.stdout + done.stderr + everything_written(tmp_path / "moe")


def test_a_recipe_checks_the_push_before_its_first_stage_and_pushes_its_card_with_the_recipe(hub, dense_models, tmp_path):
    from huggingface_hub import ModelCard

    args = ["run", "smollm2-moe", f"model={dense_models['llama']}", f"output={tmp_path / 'moe'}", "~train", "~eval",
            "upcycle.reinit_ratio=0"]
    refused = run_sparsify(*args, "push.repo_id=bob/moe", env=hub.env(token=True), cwd=tmp_path)
    assert refused.returncode == 1 and "cannot write to the namespace 'bob'" in refused.stderr
    assert not (tmp_path / "moe").exists() and not (tmp_path / "moe.run").exists()

    done = run_sparsify(*args, "push.repo_id=alice/recipe-moe", env=hub.env(token=True), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    hub.login()
    card = ModelCard.load("alice/recipe-moe")
    assert "repo_id: alice/recipe-moe" in card.text and "to: moe" in card.text  # the resolved recipe
    state = json.loads((tmp_path / "moe.run" / "state.json").read_text())
    assert state["stages"]["push"]["summary"]["changed"] is True
    again = run_sparsify(*args, "push.repo_id=alice/recipe-moe", env=hub.env(token=True), cwd=tmp_path)
    assert again.returncode == 0 and "skipped: done" in again.stdout
    assert ALICE_TOKEN not in done.stdout + done.stderr + everything_written(tmp_path / "moe", tmp_path / "moe.run")


def test_an_existing_repository_of_the_other_visibility_is_refused_not_changed(hub, folder):
    hub.login()
    push(folder, PushOptions(repo_id="alice/fmoe"))
    with pytest.raises(SparsifyError, match=r"alice/fmoe exists and is private; make it public on the Hub"):
        push(folder, PushOptions(repo_id="alice/fmoe", private=False))
    push(folder, PushOptions(repo_id="alice/open", private=False))
    with pytest.raises(SparsifyError, match=r"alice/open exists and is public; pass --public"):
        push(folder, PushOptions(repo_id="alice/open"))
    assert hub.server.repos["alice/fmoe"].private and not hub.server.repos["alice/open"].private


def test_a_push_only_recipe_keeps_the_recipe_that_made_the_folder_and_settles(hub, dense_models, tmp_path):
    from sparsify.recipe.recipe import load_recipe
    from sparsify.recipe.runner import run_recipe

    made = tmp_path / "moe"
    run_recipe(load_recipe("smollm2-moe", [f"model={dense_models['llama']}", f"output={made}", "~train", "~eval"]))
    recipe_file = tmp_path / "publish.yaml"
    recipe_file.write_text(f"model: {made}\nrun_dir: {tmp_path / 'publish.run'}\npush:\n  repo_id: alice/published\n")
    hub.login()
    first = run_recipe(load_recipe(recipe_file))
    again = run_recipe(load_recipe(recipe_file))
    assert first.summaries["push"]["changed"] and [p.status for p in again.plan] == ["done"]
    assert json.loads((made / "sparsify.json").read_text())["recipe"]["name"] == "smollm2-moe"
    assert "name: smollm2-moe" in hub.server.files("alice/published")["README.md"].decode()
