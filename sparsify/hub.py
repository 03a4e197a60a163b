"""Publishing a model folder on the Hugging Face Hub: a thin layer over `huggingface_hub`.

The token is never ours to handle: `huggingface_hub` reads it from HF_TOKEN or the login saved by
`hf auth login`, and nothing here takes one as an argument, prints it or stores it. A push checks
the token and creates the repository first (`prepare_push`), so that a recipe fails in seconds on a
bad token or namespace instead of after hours of training; then `push_folder` uploads with
`upload_folder`, which skips files the repository already has (a re-push of an unchanged folder
makes no commit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sparsify.errors import SparsifyError

# Never uploaded, wherever they sit in the folder: training run folders (checkpoints, optimizer
# state, tokenized data), half-written outputs of an interrupted write, and hidden files.
NEVER_UPLOADED = (
    "*.run/**", "**/*.run/**", "checkpoint/**", "**/checkpoint/**", "*.tokens", "**/*.tokens",
    ".*", "**/.*", ".*/**", "**/.*/**", "*.partial*", "**/*.partial*",
)
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class PushOptions:
    repo_id: str = field(default="", metadata={"help": "The Hub repository, NAMESPACE/NAME (your user name or an organisation you can write to)."})
    private: bool = field(default=True, metadata={"help": "Create the repository private (the default); false publishes it."})
    revision: str = field(default="", metadata={"help": "Branch to push to (created from main if missing); empty: main."})
    commit_message: str = field(default="", metadata={"help": "Commit message; empty: one naming the variant and sparsify."})

    def validate(self) -> None:
        if not self.repo_id:
            raise SparsifyError("push needs a repo_id, NAMESPACE/NAME (e.g. repo_id: me/smol-fmoe)")
        if not _REPO_ID.fullmatch(self.repo_id) or "--" in self.repo_id or ".." in self.repo_id or self.repo_id.endswith((".", "-")):
            raise SparsifyError(f"'{self.repo_id}' is not a Hub repository id; write NAMESPACE/NAME with letters, digits, '-', '_' or '.'")


@dataclass
class PushTarget:
    """A repository the token was checked against and that exists, ready for `push_folder`."""

    options: PushOptions
    user: str
    url: str


@dataclass
class PushResult:
    url: str
    commit: str
    changed: bool  # False: the repository already held every file (no commit was made)
    files: list[str] = field(default_factory=list)


def _api():
    from huggingface_hub import HfApi

    return HfApi()


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def prepare_push(options: PushOptions, on_status: Callable[[str], None] = lambda text: None) -> PushTarget:
    """Check the token and that it may write to the namespace, then create the repository (private
    unless asked otherwise; an existing one is kept as it is) and the branch. Seconds, no upload."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError

    options.validate()
    if get_token() is None:
        raise SparsifyError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access), then re-run")
    api = _api()
    on_status("checking the Hugging Face token")
    try:
        me = api.whoami()
    except HfHubHTTPError as error:
        raise SparsifyError(f"the Hub refused the token ({_status(error) or _first_line(error)}): set HF_TOKEN or run `hf auth login` "
                            "with a valid token, then re-run") from error
    except OSError as error:
        raise SparsifyError(f"cannot reach the Hub at {api.endpoint} ({_first_line(error)}); check the network and re-run") from error
    namespace = options.repo_id.split("/")[0]
    writable = {me.get("name")} | {org.get("name") for org in me.get("orgs") or [] if org.get("roleInOrg", "write") != "read"}
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise SparsifyError("the Hugging Face token is read-only; create one with write access (hf.co/settings/tokens) and re-run")
    if namespace not in writable:
        name = options.repo_id.split("/")[1]
        choices = " or ".join(f"{n}/{name}" for n in sorted(n for n in writable if n))
        raise SparsifyError(f"the token (user {me.get('name')}) cannot write to the namespace '{namespace}'; push to {choices}, "
                            f"or use a token that can write to '{namespace}'")
    on_status(f"creating {options.repo_id}")
    try:
        url = api.create_repo(options.repo_id, private=options.private, exist_ok=True)
        private = api.repo_info(options.repo_id).private
        if options.revision:
            api.create_branch(options.repo_id, branch=options.revision, exist_ok=True)
    except HfHubHTTPError as error:
        raise SparsifyError(f"could not create {options.repo_id} on the Hub ({_status(error) or ''} {_first_line(error)}); "
                            "check the name and the token's rights") from error
    # An existing repository keeps its visibility (create_repo does not change it). Publishing is a
    # choice made explicitly, so a mismatch either way stops the push rather than surprise the user.
    if private and not options.private:
        raise SparsifyError(f"{options.repo_id} exists and is private; make it public on the Hub (its settings) if you mean to, "
                            "or push to a new repository")
    if not private and options.private:
        raise SparsifyError(f"{options.repo_id} exists and is public; pass --public (push.private: false in a recipe) to push "
                            "to it, or push to a new repository, which is private by default")
    return PushTarget(options, str(me.get("name")), str(url))


def _head(api, options: PushOptions) -> str | None:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return api.repo_info(options.repo_id, revision=options.revision or None).sha
    except HfHubHTTPError:  # a branch not pushed to yet has no head
        return None


def push_folder(folder: Path, target: PushTarget, *, default_message: str = "Upload with sparsify",
                on_status: Callable[[str], None] = lambda text: None) -> PushResult:
    """Upload `folder` (never its run folders, checkpoints, tokenized data or hidden files) to the
    prepared repository. The local folder is only read; a failure leaves it as it was."""
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SparsifyError(f"{folder} is not a model folder (no config.json); push the folder `sparsify upcycle` or `train` wrote")
    options, api = target.options, _api()
    before = _head(api, options)
    on_status(f"uploading {folder} to {options.repo_id}")
    try:
        info = api.upload_folder(
            folder_path=folder, repo_id=options.repo_id, revision=options.revision or None,
            commit_message=options.commit_message or default_message, ignore_patterns=list(NEVER_UPLOADED),
        )
    except ValueError as error:  # the Hub's own check of the card metadata (validate-yaml)
        raise SparsifyError(f"the Hub refused {folder / 'README.md'}: {_first_line(error)}; nothing was uploaded") from error
    except (HfHubHTTPError, OSError, RuntimeError) as error:
        # A failed LFS transfer reaches us as a RuntimeError wrapping the HTTP error (hub 1.x and 2.x).
        cause = error.__cause__ if isinstance(error, RuntimeError) and error.__cause__ is not None else error
        if isinstance(error, RuntimeError) and not isinstance(cause, (HfHubHTTPError, OSError)):
            raise
        raise SparsifyError(f"the upload to {options.repo_id} failed ({_first_line(cause)}); {folder} is unchanged: re-run the "
                            "push (files already uploaded are not sent again)") from error
    commit = info.oid or ""
    return PushResult(url=_repo_url(api, options), commit=commit, changed=commit != before,
                      files=sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))


def _repo_url(api, options: PushOptions) -> str:
    base = f"{api.endpoint.rstrip('/')}/{options.repo_id}"
    return f"{base}/tree/{options.revision}" if options.revision else base


def push(folder: str | Path, options: PushOptions, *, on_status: Callable[[str], None] = lambda text: None) -> PushResult:
    """`sparsify push`: refresh the folder's model card for the repository, then check, create and upload."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SparsifyError(f"{folder} is not a folder; push a model folder written by sparsify")
    target = prepare_push(options, on_status)
    return publish(folder, target, on_status=on_status)


def publish(folder: Path, target: PushTarget, *, on_status: Callable[[str], None] = lambda text: None) -> PushResult:
    """Write the card with the repository's id in its usage snippet, then upload."""
    from sparsify.model_card import refresh_card
    from sparsify.provenance import read_record

    refresh_card(folder, repo_id=target.options.repo_id)
    record = read_record(folder) or {}
    variant = record.get("variant")
    message = f"Upload {variant} model made with sparsify" if variant else "Upload with sparsify"
    return push_folder(folder, target, default_message=message, on_status=on_status)
