"""The test Hub (tests/hub_server.py) driven by the real huggingface_hub client over HTTP: what a push
and a download go through (private repos, namespaces, LFS, no-op re-pushes, card checks, failures,
branches) and the sparsify CLI's Hub download path in a subprocess. Runs on hub 1.x and 2.x."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from hub_server import ALICE_READ_TOKEN, BOB_TOKEN, DEFAULT_GITATTRIBUTES, git_blob_sha1
from support import build_dense, sparsify_command

REPO = "alice/tiny-llama"
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 2]])
VALID_CARD = """---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M
base_model_relation: finetune
library_name: transformers
pipeline_tag: text-generation
tags: [sparsify, moe]
model-index:
- name: tiny-llama
  results:
  - task: {type: text-generation}
    dataset: {type: wikitext, name: WikiText}
    metrics:
    - {type: perplexity, value: 12.5}
---
# tiny-llama
"""


def tiny_tokenizer():
    """A word-level tokenizer over the tiny model's 128 ids (the real SmolLM2 one has 49152)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{index}" for index in range(125)]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A saved tiny random Llama (hidden 32, 2 layers, vocab 128) with a tokenizer, and its logits on IDS."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = build_dense("llama", hidden_size=32, intermediate_size=64, vocab_size=128, max_position_embeddings=64)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    with torch.no_grad():
        return folder, model(IDS).logits


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "upload"))


def contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def push(folder: Path, token: str, repo_id: str = REPO, private: bool = True, **upload):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    return api.upload_folder(folder_path=folder, repo_id=repo_id, token=token, **upload)


def test_a_private_upload_downloads_byte_for_byte_and_gives_the_same_logits(hub, tiny_llama, tmp_path):
    from huggingface_hub import HfApi, snapshot_download
    from transformers import AutoModelForCausalLM

    folder, logits = tiny_llama
    made = push(folder, hub.token)

    tree = {entry.path: entry for entry in HfApi().list_repo_tree(REPO, recursive=True, token=hub.token)}
    assert tree["model.safetensors"].lfs is not None and tree["config.json"].lfs is None
    assert tree["config.json"].blob_id == git_blob_sha1((folder / "config.json").read_bytes())
    assert hub.server.count("lfs-upload") == 1 and hub.server.count("validate-yaml") == 0

    snapshot = Path(snapshot_download(REPO, cache_dir=tmp_path / "fresh-cache", token=hub.token))
    assert snapshot.name == made.oid
    assert contents(snapshot) == {**contents(folder), ".gitattributes": DEFAULT_GITATTRIBUTES.encode()}
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(snapshot).eval()(IDS).logits, logits)


def test_a_private_repo_is_hidden_without_its_owners_token_and_a_public_one_is_not(hub, tiny_llama, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    folder, _ = tiny_llama
    push(folder, hub.token, "alice/secret", private=True)
    push(folder, hub.token, "alice/open", private=False)
    api = HfApi()

    for token, status in ((False, 401), (BOB_TOKEN, 404)):
        with pytest.raises(RepositoryNotFoundError) as refused:
            api.model_info("alice/secret", token=token)
        assert refused.value.response.status_code == status
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("alice/secret", "config.json", token=token, cache_dir=tmp_path / f"cache-{status}")
    assert api.model_info("alice/secret", token=hub.token).private is True

    seen = api.model_info("alice/open", token=False, files_metadata=True)
    assert seen.private is False and {"config.json", "model.safetensors"} <= {sibling.rfilename for sibling in seen.siblings}
    fetched = hf_hub_download("alice/open", "config.json", token=False, cache_dir=tmp_path / "anonymous")
    assert Path(fetched).read_bytes() == (folder / "config.json").read_bytes()


def test_whoami_names_the_user_its_orgs_and_the_token_role(hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    me = HfApi().whoami(token=hub.token)
    assert me["name"] == "alice" and me["auth"]["accessToken"]["role"] == "write"
    assert {org["name"]: org["roleInOrg"] for org in me["orgs"]} == {"team": "write", "readers": "read"}
    assert HfApi().whoami(token=ALICE_READ_TOKEN)["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as refused:
        HfApi().whoami(token="hf_not_a_token")
    assert refused.value.response.status_code == 401

    hub.login()  # the token the client finds by itself (HF_TOKEN), as the push code relies on
    assert HfApi().whoami()["name"] == "alice"


def test_creating_a_repo_where_the_token_cannot_write_is_forbidden(hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    for repo_id, token in (("bob/mine", hub.token), ("bobs-org/x", hub.token), ("readers/x", hub.token), ("alice/x", ALICE_READ_TOKEN)):
        with pytest.raises(HfHubHTTPError) as refused:
            api.create_repo(repo_id, private=True, token=token)
        assert refused.value.response.status_code == 403, repo_id
    with pytest.raises(HfHubHTTPError) as anonymous:
        api.create_repo("alice/x", token=False)
    assert anonymous.value.response.status_code == 401

    assert str(api.create_repo("team/shared", private=True, token=hub.token)) == f"{hub.url}/team/shared"
    assert str(api.create_repo("team/shared", exist_ok=True, token=hub.token)) == f"{hub.url}/team/shared"  # a 409 with its url
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_repo("team/shared", token=hub.token)
    assert exists.value.response.status_code == 409
    assert set(hub.server.repos) == {"team/shared"}


def test_reuploading_an_unchanged_folder_makes_no_commit_and_one_changed_file_makes_one(hub, tiny_llama, tmp_path):
    folder = copy_of(tiny_llama[0], tmp_path)
    first = push(folder, hub.token)
    commits, lfs_uploads = len(hub.server.commits[REPO]), hub.server.count("lfs-upload")

    again = push(folder, hub.token)
    assert again.oid == first.oid and len(hub.server.commits[REPO]) == commits
    assert hub.server.count("commit") == 1 and hub.server.count("lfs-upload") == lfs_uploads

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "note": "changed"}))
    changed = push(folder, hub.token)
    assert changed.oid != first.oid and len(hub.server.commits[REPO]) == commits + 1
    assert hub.server.files(REPO) == {**contents(folder), ".gitattributes": DEFAULT_GITATTRIBUTES.encode()}
    assert hub.server.count("lfs-upload") == lfs_uploads  # the weights did not change


def test_a_card_with_valid_metadata_passes_and_reads_back(hub, tiny_llama, tmp_path):
    from huggingface_hub import HfApi, ModelCard

    folder = copy_of(tiny_llama[0], tmp_path)
    (folder / "README.md").write_text(VALID_CARD)
    push(folder, hub.token)
    assert hub.server.count("validate-yaml", status=200) >= 1  # upload_folder checks before hashing, create_commit again

    card = ModelCard.load(REPO, token=hub.token)
    assert card.data.base_model_relation == "finetune" and card.data.license == "apache-2.0"
    assert card.data.eval_results[0].metric_value == 12.5
    info = HfApi().model_info(REPO, token=hub.token)
    assert info.pipeline_tag == "text-generation" and info.card_data.base_model == "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.parametrize("bad, fragment", [
    ("base_model_relation: bogus", "base_model_relation"),
    ("license: apache 2", "license"),
    ("pipeline_tag: [text-generation]", "pipeline_tag"),
    ("model-index:\n- name: x\n  results:\n  - task: {type: text-generation}", "model-index"),
    ("license: [unclosed", "does not parse"),
])
def test_a_card_the_hub_refuses_fails_the_upload_before_any_commit(hub, tiny_llama, tmp_path, bad, fragment):
    folder = copy_of(tiny_llama[0], tmp_path)
    (folder / "README.md").write_text(f"---\nlibrary_name: transformers\n{bad}\n---\n# card\n")
    with pytest.raises(ValueError, match=fragment):
        push(folder, hub.token)
    assert len(hub.server.commits[REPO]) == 1  # the initial commit only
    assert hub.server.count("preupload") == 0 and hub.server.count("validate-yaml", status=400) == 1


def test_a_failed_commit_leaves_the_folder_untouched_and_a_retry_succeeds(hub, tiny_llama, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    folder = copy_of(tiny_llama[0], tmp_path)
    before = contents(folder)
    hub.server.fail("commit")
    with pytest.raises(HfHubHTTPError) as failed:
        push(folder, hub.token)
    assert failed.value.response.status_code == 500
    assert contents(folder) == before and len(hub.server.commits[REPO]) == 1

    hub.server.clear_failures()
    push(folder, hub.token)
    assert hub.server.files(REPO) == {**before, ".gitattributes": DEFAULT_GITATTRIBUTES.encode()}
    assert hub.server.count("lfs-upload") == 1  # the weights reached the server before the failed commit


def test_a_refused_lfs_upload_fails_the_push_without_a_commit(hub, tiny_llama, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    folder = copy_of(tiny_llama[0], tmp_path)
    hub.server.fail("lfs-upload", status=403)  # a 5xx would be retried for 23 s before failing
    # The client wraps the HTTP error of an LFS upload in a RuntimeError.
    with pytest.raises(RuntimeError, match="model.safetensors") as failed:
        push(folder, hub.token)
    assert isinstance(failed.value.__cause__, HfHubHTTPError)
    assert len(hub.server.commits[REPO]) == 1 and hub.server.count("commit") == 0


def test_an_upload_to_a_branch_needs_the_branch_first(hub, tiny_llama, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    folder = copy_of(tiny_llama[0], tmp_path)
    api = HfApi()
    api.create_repo(REPO, private=True, token=hub.token)
    with pytest.raises(RevisionNotFoundError):
        api.upload_folder(folder_path=folder, repo_id=REPO, revision="dev", token=hub.token)

    api.create_branch(REPO, branch="dev", exist_ok=True, token=hub.token)
    api.create_branch(REPO, branch="dev", exist_ok=True, token=hub.token)  # a 409, which exist_ok accepts
    made = api.upload_folder(folder_path=folder, repo_id=REPO, revision="dev", token=hub.token)
    assert api.model_info(REPO, revision="dev", token=hub.token).sha == made.oid
    assert set(hub.server.files(REPO)) == {".gitattributes"}  # main is untouched
    assert [ref.name for ref in api.list_repo_refs(REPO, token=hub.token).branches] == ["main", "dev"]


def test_downloads_honour_byte_ranges(hub, tiny_llama):
    folder, _ = tiny_llama
    push(folder, hub.token, private=False)
    weights = (folder / "model.safetensors").read_bytes()
    ask = urllib.request.Request(f"{hub.url}/{REPO}/resolve/main/model.safetensors", headers={"Range": "bytes=100-199"})
    with urllib.request.urlopen(ask) as answer:
        assert answer.status == 206 and answer.read() == weights[100:200]
        assert answer.headers["Content-Range"] == f"bytes 100-199/{len(weights)}"
        assert answer.headers["X-Linked-Size"] == str(len(weights)) and answer.headers["X-Repo-Commit"]


def test_a_chunked_body_is_read_whole_and_the_connection_stays_usable(hub):
    connection = http.client.HTTPConnection(urlsplit(hub.url).netloc, timeout=10)
    card = json.dumps({"content": VALID_CARD, "repoType": "model"}).encode()
    # An iterable body without a length goes out as Transfer-Encoding: chunked.
    connection.request("POST", "/api/validate-yaml", body=iter([card[:40], card[40:]]), headers={"Content-Type": "application/json"})
    checked = connection.getresponse()
    assert checked.status == 200 and json.loads(checked.read()) == {"errors": [], "warnings": []}
    connection.request("GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {hub.token}"})  # same connection
    assert json.loads(connection.getresponse().read())["name"] == "alice"
    connection.close()


def test_an_unknown_route_is_recorded(hub):
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{hub.url}/api/spaces-hardware")
    assert missing.value.code == 404
    assert hub.server.unhandled == ["GET /api/spaces-hardware"]
    hub.server.calls.clear()  # else the fixture fails this test for it


def run_sparsify(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*sparsify_command(), *args], capture_output=True, text=True, env={**env, "COLUMNS": "200"}, timeout=300)


def test_the_cli_converts_a_private_hub_model_and_records_its_commit(hub, tiny_llama, tmp_path):
    folder, _ = tiny_llama
    made = push(folder, hub.token, private=True)

    output = tmp_path / "moe"
    done = run_sparsify("upcycle", REPO, "--to", "moe", "--experts", "2", "--top-k", "1", "-o", str(output), env=hub.env(token=True))
    assert done.returncode == 0, done.stderr
    source = json.loads((output / "sparsify.json").read_text())["source"]
    assert source["kind"] == "hub" and source["hub_id"] == REPO and source["revision"] == made.oid

    # Without HF_TOKEN (and a cache that does not hold the model) the Hub hides the repository.
    anonymous = hub.env(token=False, home=tmp_path / "empty-home")
    refused = run_sparsify("upcycle", REPO, "--to", "moe", "-o", str(tmp_path / "no"), env=anonymous)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 1 and len(lines) == 1 and "HF_TOKEN" in lines[0], refused.stderr
    assert not (tmp_path / "no").exists()
