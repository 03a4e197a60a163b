"""A small Hugging Face Hub on 127.0.0.1, for tests that drive the real `huggingface_hub` client.

No self-hostable Hub accepts uploads offline, so this speaks just enough of the Hub's HTTP protocol
for what sparsify does (whoami, create_repo, upload_folder with LFS, card checks, snapshot_download,
branches), with the answers and `X-Error-Code` headers the client turns into its own exceptions.
Hub 1.x and 2.x speak the same protocol here (see tests/hub/test_hub_server.py).

    with HubServer(tokens={"hf_alice": "alice"}, orgs={"alice": ["team"]}) as server:
        ...  # server.url; point the client at it with `point_client` or the `hub` fixture

Repositories live in memory: a commit maps paths to `StoredFile`s (content addressed: a regular file
by its git blob sha1, an LFS file by its sha256), and a new repository starts, as on the Hub, with a
commit holding the default .gitattributes, which is also what decides which files go to LFS.

Traps this module handles for the tests: huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE
and HF_HUB_DISABLE_XET once, at import, into `huggingface_hub.constants` (and its module-level HfApi
keeps the endpoint it saw), so an in-process test must patch those (`point_client`) while a
subprocess gets environment variables (`subprocess_env`); Xet uploads cannot work offline, so Xet is
always off; the home folder is a fresh one so that a developer's saved login is never read or written.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import secrets
import socket
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# ---------------------------------------------------------------------------------------------
# The Hub's rules, as data
# ---------------------------------------------------------------------------------------------

# The licence identifiers a card's `license` may take: the table in huggingface/hub-docs,
# docs/hub/repositories-licenses.md (https://huggingface.co/docs/hub/repositories-licenses), plus
# the llama3, llama3.1, llama3.2 and llama3.3 rows later revisions added (hub-docs PR #1619).
HUB_LICENSES = frozenset("""
    apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear
    c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0
    cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0
    cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl
    ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1
    lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa
    unlicense zlib pddl lgpl-lr deepfloyd-if-license llama2 llama3 llama3.1 llama3.2 llama3.3 gemma
    unknown other
""".split())

# How a child model relates to its `base_model`: the Hub's model tree knows only these.
BASE_MODEL_RELATIONS = frozenset({"adapter", "merge", "quantized", "finetune"})


def _model_index_parses(value: Any) -> bool:
    # The Hub and huggingface_hub read `model-index` the same way; the client's parser is the spec.
    from huggingface_hub.repocard_data import model_index_to_eval_results

    try:
        model_index_to_eval_results(value)
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def _is_str_or_list_of_str(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value))


# card metadata key -> (test its value passes, the error the Hub gives when it does not)
CARD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "license": (lambda value: isinstance(value, str) and value in HUB_LICENSES,
                '"license" must be one of the Hub\'s licence identifiers (apache-2.0, mit, llama3.1, other, ...)'),
    "base_model": (_is_str_or_list_of_str, '"base_model" must be a model id or a list of model ids'),
    "base_model_relation": (lambda value: value in BASE_MODEL_RELATIONS,
                            f'"base_model_relation" must be one of {", ".join(sorted(BASE_MODEL_RELATIONS))}'),
    "pipeline_tag": (lambda value: isinstance(value, str), '"pipeline_tag" must be a string'),
    "model-index": (_model_index_parses, '"model-index" is not a valid model index (name, results: task, dataset, metrics)'),
}
MISSING_METADATA_WARNING = "empty or missing yaml metadata in repo card"

# The Hub answers a card's front matter between two `---` lines at the very top.
FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)

# The .gitattributes a new Hub repository starts with: the `filter=lfs` patterns send matching files
# to LFS (what `preupload` answers), as they do on the Hub.
DEFAULT_GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle",
    "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite",
    "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
))
# Whatever its name, a file this large, or one that looks binary (a NUL byte in its first bytes, git's
# own test), goes to LFS: the Hub refuses such files in a plain git commit.
LFS_MIN_SIZE = 10 * 1024 * 1024

# Test users: alice writes to her own namespace and to the org "team", only reads "readers".
ALICE_TOKEN = "hf_alice_write_token"
ALICE_READ_TOKEN = "hf_alice_read_token"
BOB_TOKEN = "hf_bob_write_token"
TEST_TOKENS = {ALICE_TOKEN: "alice", ALICE_READ_TOKEN: ("alice", "read"), BOB_TOKEN: "bob"}
TEST_ORGS = {"alice": {"team": "write", "readers": "read"}, "bob": ["bobs-org"]}

# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class StoredFile:
    content: bytes
    lfs: bool
    sha256: str
    git_oid: str  # git's blob sha1 of the file, or of its LFS pointer

    @classmethod
    def of(cls, content: bytes, lfs: bool) -> "StoredFile":
        sha256 = hashlib.sha256(content).hexdigest()
        stored = content if not lfs else _lfs_pointer(sha256, len(content))
        return cls(content, lfs, sha256, git_blob_sha1(stored))

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, len(self.content)))

    @property
    def remote_oid(self) -> str:
        """What preupload compares the client's local oid with: sha256 for LFS, git sha1 otherwise."""
        return self.sha256 if self.lfs else self.git_oid


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, StoredFile]  # never mutated: a new commit gets a new dict


@dataclass
class Repo:
    id: str
    kind: str  # model, dataset, space, kernel
    private: bool
    created_at: str = field(default_factory=_now)
    branches: dict[str, str] = field(default_factory=dict)  # name (main, refs/pr/1) -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    history: list[Commit] = field(default_factory=list)  # in the order they were made
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content

    @property
    def namespace(self) -> str:
        return self.id.split("/")[0]

    def resolve(self, revision: str) -> Commit | None:
        """A branch, refs/heads/branch, refs/pr/N, or a full commit sha."""
        name = revision.removeprefix("refs/heads/")
        if name in self.branches:
            return self.commits[self.branches[name]]
        return self.commits.get(revision)

    def commit(self, branch: str, title: str, message: str, author: str, files: dict[str, StoredFile]) -> Commit:
        parent = self.branches.get(branch)
        listing = "".join(f"{path}\0{stored.git_oid}\n" for path, stored in sorted(files.items()))
        date = _now()
        sha = hashlib.sha1(f"{parent}\n{title}\n{message}\n{author}\n{date}\n{len(self.history)}\n{listing}".encode()).hexdigest()
        made = Commit(sha, parent, title, message, author, date, files)
        self.commits[sha] = made
        self.history.append(made)
        self.branches[branch] = sha
        return made

    def last_change(self, commit: Commit, path: str) -> Commit:
        """The oldest ancestor of `commit` since which `path` has had its current content."""
        while commit.parent is not None:
            parent = self.commits[commit.parent]
            if parent.files.get(path) != commit.files.get(path):
                break
            commit = parent
        return commit

    def goes_to_lfs(self, commit: Commit, path: str, size: int, sample: bytes) -> bool:
        if size >= LFS_MIN_SIZE or b"\0" in sample:
            return True
        attributes = commit.files.get(".gitattributes")
        text = attributes.content.decode(errors="replace") if attributes else ""
        patterns = [line.split()[0] for line in text.splitlines() if "filter=lfs" in line.split()[1:]]
        name = path.rsplit("/", 1)[-1]
        # git matches a pattern without a slash against the file name, one with a slash against the path.
        return any(fnmatch.fnmatchcase(path if "/" in pattern else name, pattern) for pattern in patterns)


# ---------------------------------------------------------------------------------------------
# Card checks (POST /api/validate-yaml)
# ---------------------------------------------------------------------------------------------


def check_card(content: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) the Hub would give for a README.md's metadata."""
    found = FRONT_MATTER.match(content)
    if not found:
        return [], [MISSING_METADATA_WARNING]
    try:
        metadata = yaml.safe_load(found.group(1))
    except yaml.YAMLError as error:
        return [f"YAML metadata does not parse: {str(error).splitlines()[0]}"], []
    if metadata is None:
        return [], [MISSING_METADATA_WARNING]
    if not isinstance(metadata, dict):
        return ["YAML metadata must be a mapping of keys to values"], []
    errors = [message for key, (passes, message) in CARD_RULES.items() if key in metadata and not passes(metadata[key])]
    return errors, []


def card_metadata(stored: StoredFile | None) -> dict | None:
    if stored is None:
        return None
    found = FRONT_MATTER.match(stored.content.decode(errors="replace"))
    try:
        metadata = yaml.safe_load(found.group(1)) if found else None
    except yaml.YAMLError:
        return None
    return metadata if isinstance(metadata, dict) else None


# ---------------------------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------------------------


class HubError(Exception):
    """An error answer: status, JSON {"error": message} and the headers the client reads."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, list[str]]
    headers: Any  # email.message.Message from http.server
    body: bytes
    base_url: str
    token: str | None
    user: str | None
    role: str | None  # the token's role: write or read
    args: dict[str, str] = field(default_factory=dict)  # the route's path parts, unquoted

    def json(self) -> Any:
        return json.loads(self.body or b"{}")

    def flag(self, name: str) -> bool:
        return (self.params.get(name) or ["false"])[0].lower() in ("1", "true")


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    @classmethod
    def of_json(cls, value: Any, status: int = 200, headers: dict[str, str] | None = None) -> "Reply":
        return cls(status, json.dumps(value).encode(), headers or {})


@dataclass(frozen=True)
class Call:
    method: str
    route: str  # a route name from ROUTES, or "unhandled"
    path: str
    status: int


_API = r"/api/(?P<kind>models|datasets|spaces|kernels)/(?P<repo>[^/]+/[^/]+)"
_FILES = r"/(?:(?P<kind>datasets|spaces|kernels)/)?(?P<repo>[^/]+/[^/]+)"
# (methods, route name, path pattern, HubServer method): the names are what `fail` and `calls` take.
ROUTES = (
    ("GET", "whoami", r"/api/whoami-v2", "whoami"),
    ("GET", "agent-harnesses", r"/api/agent-harnesses", "agent_harnesses"),
    ("POST", "create-repo", r"/api/repos/create", "create_repo"),
    ("POST", "validate-yaml", r"/api/validate-yaml", "validate_yaml"),
    ("GET", "info", _API + r"(?:/revision/(?P<rev>[^/]+))?", "info"),
    ("GET", "tree", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
    ("POST", "paths-info", _API + r"/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("GET", "refs", _API + r"/refs", "refs"),
    ("GET", "commits", _API + r"/commits/(?P<rev>[^/]+)", "list_commits"),
    ("POST", "create-branch", _API + r"/branch/(?P<branch>[^/]+)", "create_branch"),
    ("DELETE", "delete-branch", _API + r"/branch/(?P<branch>[^/]+)", "delete_branch"),
    ("POST", "preupload", _API + r"/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", "lfs-batch", _FILES + r"\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", "lfs-upload", r"/_lfs/upload/(?P<ticket>\w+)", "lfs_upload"),
    ("POST", "lfs-verify", r"/_lfs/verify/(?P<ticket>\w+)", "lfs_verify"),
    ("POST", "commit", _API + r"/commit/(?P<rev>[^/]+)", "commit"),
    ("GET HEAD", "resolve", _FILES + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
)
_COMPILED = [(methods.split(), name, re.compile(pattern), handler) for methods, name, pattern, handler in ROUTES]
ROUTE_NAMES = frozenset(name for _, name, _, _ in ROUTES)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: "_HTTPServer"

    def do_GET(self):
        self.server.hub._answer(self)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def setup(self):
        super().setup()
        self.server.open_connections.add(self.connection)

    def finish(self):
        self.server.open_connections.discard(self.connection)
        super().finish()

    def read_body(self) -> bytes:
        """The whole body, whichever way it was sent: a keep-alive connection must not keep leftovers."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers, then the empty line
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass  # the server keeps `calls` instead of printing to stderr


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: "HubServer"
    open_connections: set


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


class HubServer:
    """The Hub on 127.0.0.1:<free port>. `tokens`: token -> user, or -> (user, "read") for a
    read-only token; `orgs`: user -> org names (write access) or {org: "read" | "write" | "admin"}."""

    def __init__(self, tokens: dict[str, Any] | None = None, orgs: dict[str, Any] | None = None):
        self.tokens: dict[str, tuple[str, str]] = {
            token: (owner, "write") if isinstance(owner, str) else tuple(owner) for token, owner in (tokens or {}).items()
        }
        self.orgs: dict[str, dict[str, str]] = {
            user: dict(names) if isinstance(names, dict) else {name: "write" for name in names} for user, names in (orgs or {}).items()
        }
        self.repos: dict[str, Repo] = {}
        self.calls: list[Call] = []
        self.errors: list[str] = []  # tracebacks of requests the server itself failed on
        self._failures: dict[str, list] = {}  # route -> [times left or None for always, status]
        self._tickets: dict[str, tuple[str, str, int]] = {}  # LFS upload ticket -> (repo key, sha256, size)
        self._lock = threading.RLock()
        self._httpd: _HTTPServer | None = None
        self.url = ""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "HubServer":
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.hub, httpd.open_connections = self, set()
        self._httpd, self.url = httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
        # A short poll keeps `stop` (and so each test's teardown) fast.
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="hub-server", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        for connection in list(self._httpd.open_connections):  # idle keep-alive connections
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()
        self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what tests look at and control ------------------------------------------------------------

    def fail(self, route: str, times: int | None = None, status: int = 500) -> None:
        """Answer `status` on `route` (a name from ROUTES) `times` times, or until `clear_failures`.
        The client retries 5xx on preupload, lfs-batch, lfs-upload and lfs-verify (after 1, 2, 4, 8,
        8 s) but not on commit; a 4xx is never retried."""
        if route not in ROUTE_NAMES:
            raise ValueError(f"no route '{route}'; the routes are {', '.join(sorted(ROUTE_NAMES))}")
        with self._lock:
            self._failures[route] = [times, status]

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def count(self, route: str, status: int | None = None) -> int:
        """How many requests `route` answered (with `status`, if given)."""
        with self._lock:
            return sum(call.route == route and status in (None, call.status) for call in self.calls)

    @property
    def unhandled(self) -> list[str]:
        """'METHOD /path' of every request no route knew: a test asserts there are none."""
        with self._lock:
            return [f"{call.method} {call.path}" for call in self.calls if call.route == "unhandled"]

    @property
    def commits(self) -> dict[str, list[Commit]]:
        """Repo id -> its commits in the order they were made (the first: the initial .gitattributes)."""
        with self._lock:
            return {key: list(repo.history) for key, repo in self.repos.items()}

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The repository's files at `revision`: path -> content."""
        with self._lock:
            commit = self.repos[repo_id].resolve(revision)
            assert commit is not None, f"{repo_id} has no revision {revision}"
            return {path: stored.content for path, stored in commit.files.items()}

    # -- dispatch -------------------------------------------------------------------------------

    def _answer(self, handler: _Handler) -> None:
        body = handler.read_body()
        split = urlsplit(handler.path)
        route, reply = "unhandled", None
        for methods, name, pattern, method_name in _COMPILED:
            found = pattern.fullmatch(split.path)
            if found and handler.command in methods:
                route = name
                args = {key: unquote(value) for key, value in found.groupdict().items() if value is not None}
                try:
                    reply = self._run(name, getattr(self, method_name), handler, split, body, args)
                except Exception:  # a bug here: answer, and let the fixture fail the test
                    with self._lock:
                        self.errors.append(traceback.format_exc())
                    reply = Reply.of_json({"error": "the test Hub failed on this request"}, 500)
                break
        if reply is None:
            reply = Reply.of_json({"error": f"this test Hub has no route for {handler.command} {split.path}"}, 404)
        with self._lock:
            self.calls.append(Call(handler.command, route, split.path, reply.status))
        handler.send(reply)

    def _run(self, route: str, method: Callable[[Request], Reply], handler: _Handler, split, body: bytes, args) -> Reply:
        with self._lock:
            failure = self._failures.get(route)
            if failure is not None:
                failure[0] = None if failure[0] is None else failure[0] - 1
                if failure[0] is not None and failure[0] <= 0:
                    del self._failures[route]
                return Reply.of_json({"error": f"injected failure on {route}"}, failure[1])
        authorization = handler.headers.get("Authorization") or ""
        token = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
        user, role = self.tokens.get(token, (None, None)) if token else (None, None)
        request = Request(handler.command, split.path, parse_qs(split.query), handler.headers, body, self.url, token, user, role, args)
        try:
            if token and user is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            with self._lock:
                return method(request)
        except HubError as error:
            headers = {**error.headers, "X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            return Reply.of_json({"error": error.message}, error.status, headers)

    # -- access -------------------------------------------------------------------------------------

    def _can_read_namespace(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or namespace in self.orgs.get(user, {}))

    def _can_write_namespace(self, request: Request, namespace: str) -> bool:
        if request.user is None or request.role != "write":
            return False
        return request.user == namespace or self.orgs.get(request.user, {}).get(namespace) in ("write", "admin")

    def _repo(self, request: Request, write: bool = False) -> Repo:
        """The route's repository, or the answer the Hub gives to someone who may not see (or write) it."""
        kind = request.args.get("kind", "models").removesuffix("s")
        key = _key(kind, request.args["repo"])
        repo = self.repos.get(key)
        if repo is None or (repo.private and not self._can_read_namespace(request.user, repo.namespace)):
            # The Hub does not tell a missing repository from a private one.
            if request.user is None:
                raise HubError(401, "Invalid username or password.", "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and not self._can_write_namespace(request, repo.namespace):
            raise HubError(401 if request.user is None else 403, f"You don't have the rights to write to {repo.id}")
        return repo

    @staticmethod
    def _revision(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    @staticmethod
    def _branch(repo: Repo, revision: str) -> str:
        branch = revision.removeprefix("refs/heads/")
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} is not a branch", "RevisionNotFound")
        return branch

    # -- account ------------------------------------------------------------------------------------

    def whoami(self, request: Request) -> Reply:
        if request.user is None:
            raise HubError(401, "Invalid username or password.")
        orgs = [{"type": "org", "name": name, "fullname": name, "roleInOrg": role}
                for name, role in self.orgs.get(request.user, {}).items()]
        return Reply.of_json({
            "type": "user", "id": hashlib.sha1(request.user.encode()).hexdigest()[:24], "name": request.user,
            "fullname": request.user.title(), "email": f"{request.user}@example.com", "emailVerified": True, "isPro": False,
            "orgs": orgs, "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": request.role}},
        })

    def agent_harnesses(self, request: Request) -> Reply:
        return Reply.of_json({"standardEnvVars": [], "harnesses": {}})  # hub 2.x asks; none are known here

    # -- repositories -------------------------------------------------------------------------------

    def create_repo(self, request: Request) -> Reply:
        asked = request.json()
        kind = asked.get("type") or "model"
        name = asked.get("name") or ""
        if request.user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        namespace = asked.get("organization") or request.user
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or "--" in name or ".." in name:
            raise HubError(400, f"'{name}' is not a valid repository name")
        repo_id = f"{namespace}/{name}"
        url = request.base_url + "/" + (repo_id if kind == "model" else f"{kind}s/{repo_id}")
        if not self._can_write_namespace(request, namespace):
            raise HubError(403, f"You don't have the rights to create a {kind} under the namespace \"{namespace}\"")
        if _key(kind, repo_id) in self.repos:
            return Reply.of_json({"error": "You already created this repo", "url": url}, 409)
        private = bool(asked.get("private")) or asked.get("visibility") == "private"
        repo = self.repos[_key(kind, repo_id)] = Repo(repo_id, kind, private)
        attributes = StoredFile.of(DEFAULT_GITATTRIBUTES.encode(), lfs=False)
        repo.commit("main", "initial commit", "", request.user, {".gitattributes": attributes})
        return Reply.of_json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def info(self, request: Request) -> Reply:
        repo = self._repo(request)
        commit = self._revision(repo, request.args.get("rev", "main"))
        blobs = request.flag("blobs")
        siblings = []
        for path, stored in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(stored.content), blobId=stored.git_oid)
                if stored.lfs:
                    sibling["lfs"] = {"sha256": stored.sha256, "size": len(stored.content), "pointerSize": stored.pointer_size}
            siblings.append(sibling)
        card = card_metadata(commit.files.get("README.md"))
        found = {
            "_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24], "id": repo.id, "author": repo.namespace, "sha": commit.sha,
            "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private, "gated": False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": list((card or {}).get("tags") or []), "siblings": siblings,
        }
        if card:
            found["cardData"] = card
            for key in ("pipeline_tag", "library_name"):
                if key in card:
                    found[key] = card[key]
        if repo.kind == "model":
            found["modelId"] = repo.id
        return Reply.of_json(found)

    def tree(self, request: Request) -> Reply:
        repo = self._repo(request)
        commit = self._revision(repo, request.args["rev"])
        folder = request.args.get("path", "").strip("/")
        entries = _listing(repo, commit, folder, recursive=request.flag("recursive"), expand=request.flag("expand"))
        if folder and not entries:
            raise HubError(404, f"{folder} does not exist at {request.args['rev']}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        return Reply.of_json(entries)

    def paths_info(self, request: Request) -> Reply:
        repo = self._repo(request)
        commit = self._revision(repo, request.args["rev"])
        content_type = request.headers.get("Content-Type", "")
        # The client posts a form (paths=a&paths=b&expand=False); JSON is taken too.
        form = parse_qs(request.body.decode())
        asked = request.json() if "json" in content_type else {key: values if key == "paths" else values[0] for key, values in form.items()}
        paths = asked.get("paths") or []
        expand = str(asked.get("expand", "false")).lower() in ("1", "true")
        entries = _listing(repo, commit, "", recursive=True, expand=expand)
        wanted = {path.strip("/") for path in ([paths] if isinstance(paths, str) else paths)}
        return Reply.of_json([entry for entry in entries if entry["path"] in wanted])

    def refs(self, request: Request) -> Reply:
        repo = self._repo(request)
        described = [{"name": name, "ref": name if name.startswith("refs/") else f"refs/heads/{name}", "targetCommit": sha}
                     for name, sha in repo.branches.items()]
        return Reply.of_json({
            "branches": [ref for ref in described if not ref["name"].startswith("refs/pr/")], "converts": [], "tags": [],
            "pullRequests": [ref for ref in described if ref["name"].startswith("refs/pr/")] if request.flag("include_prs") else None,
        })

    def list_commits(self, request: Request) -> Reply:
        repo = self._repo(request)
        commit: Commit | None = self._revision(repo, request.args["rev"])
        described = []
        while commit is not None:
            described.append({"id": commit.sha, "title": commit.title, "message": commit.message, "date": commit.date,
                              "authors": [{"user": commit.author}]})
            commit = repo.commits[commit.parent] if commit.parent else None
        return Reply.of_json(described)

    def create_branch(self, request: Request) -> Reply:
        repo = self._repo(request, write=True)
        branch = request.args["branch"]
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._revision(repo, request.json().get("startingPoint") or "main")
        repo.branches[branch] = start.sha
        return Reply.of_json({})

    def delete_branch(self, request: Request) -> Reply:
        repo = self._repo(request, write=True)
        del repo.branches[self._branch(repo, request.args["branch"])]
        return Reply.of_json({})

    # -- card check -----------------------------------------------------------------------------------

    def validate_yaml(self, request: Request) -> Reply:
        errors, warnings = check_card(request.json().get("content") or "")
        described = {"errors": [{"message": message} for message in errors], "warnings": [{"message": message} for message in warnings]}
        if errors:
            return Reply.of_json({"error": errors[0], **described}, 400)
        return Reply.of_json(described)

    # -- upload: preupload, LFS, commit ---------------------------------------------------------------

    def preupload(self, request: Request) -> Reply:
        repo = self._repo(request, write=True)
        commit = self._revision(repo, self._branch(repo, request.args["rev"]))
        gitignore = request.json().get("gitIgnore") or ""
        ignored = [line.strip() for line in gitignore.splitlines() if line.strip() and not line.startswith("#")]
        answers = []
        for asked in request.json().get("files", []):
            path = asked["path"]
            lfs = repo.goes_to_lfs(commit, path, int(asked.get("size", 0)), base64.b64decode(asked.get("sample") or ""))
            answer = {"path": path, "uploadMode": "lfs" if lfs else "regular",
                      "shouldIgnore": any(fnmatch.fnmatchcase(path, pattern) for pattern in ignored)}
            if path in commit.files:  # lets the client drop unchanged files from the commit
                answer["oid"] = commit.files[path].remote_oid
            answers.append(answer)
        return Reply.of_json({"files": answers, "commitOid": commit.sha})

    def lfs_batch(self, request: Request) -> Reply:
        repo = self._repo(request, write=True)
        asked = request.json()
        if asked.get("operation") != "upload":
            raise HubError(400, "this test Hub only takes LFS uploads")
        if (asked.get("ref") or {}).get("name"):
            self._branch(repo, asked["ref"]["name"])
        objects = []
        for wanted in asked.get("objects", []):
            oid, size = wanted["oid"], int(wanted["size"])
            described: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs_objects:  # no actions: the client skips the upload
                ticket = secrets.token_hex(16)
                self._tickets[ticket] = (_key(repo.kind, repo.id), oid, size)
                described["actions"] = {"upload": {"href": f"{request.base_url}/_lfs/upload/{ticket}"},
                                        "verify": {"href": f"{request.base_url}/_lfs/verify/{ticket}"}}
            objects.append(described)
        return Reply.of_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_upload(self, request: Request) -> Reply:
        # Like the Hub's storage URLs, the ticket in the URL is the authorisation: the client sends no token.
        key, oid, size = self._ticket(request)
        if hashlib.sha256(request.body).hexdigest() != oid or len(request.body) != size:
            raise HubError(400, f"the uploaded content does not have sha256 {oid} and size {size}")
        self.repos[key].lfs_objects[oid] = request.body
        return Reply(200, b"", {"ETag": f'"{oid}"'})

    def lfs_verify(self, request: Request) -> Reply:
        key, oid, size = self._ticket(request)
        stored = self.repos[key].lfs_objects.get(oid)
        if stored is None or len(stored) != size:
            raise HubError(404, f"LFS object {oid} was not uploaded")
        return Reply.of_json({"success": True})

    def _ticket(self, request: Request) -> tuple[str, str, int]:
        found = self._tickets.get(request.args["ticket"])
        if found is None:
            raise HubError(403, "unknown or expired upload URL")
        return found

    def commit(self, request: Request) -> Reply:
        repo = self._repo(request, write=True)
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "a commit starts with a header line")
        header = lines[0]["value"]
        create_pr = request.flag("create_pr")
        branch = self._branch(repo, request.args["rev"])
        head = repo.commits[repo.branches[branch]]
        parent = header.get("parentCommit")
        if parent and not head.sha.startswith(parent) and not create_pr:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        if create_pr:
            branch = f"refs/pr/{1 + sum(name.startswith('refs/pr/') for name in repo.branches)}"
            repo.branches[branch] = (repo.resolve(parent) or head).sha if parent else head.sha
            head = repo.commits[repo.branches[branch]]
        files = dict(head.files)
        for line in lines[1:]:
            _apply(repo, files, line["key"], line["value"])
        made = repo.commit(branch, header.get("summary") or "", header.get("description") or "", request.user or "", files)
        prefix = request.base_url + "/" + (repo.id if repo.kind == "model" else f"{repo.kind}s/{repo.id}")
        return Reply.of_json({
            "success": True, "commitOid": made.sha, "commitUrl": f"{prefix}/commit/{made.sha}", "hookOutput": "",
            "pullRequestUrl": f"{prefix}/discussions/{branch.rsplit('/', 1)[-1]}" if create_pr else None,
        })

    # -- download -------------------------------------------------------------------------------------

    def resolve(self, request: Request) -> Reply:
        repo = self._repo(request)
        commit = self._revision(repo, request.args["rev"])
        stored = commit.files.get(request.args["path"])
        if stored is None:
            raise HubError(404, f"{request.args['path']} does not exist at {commit.sha}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{stored.remote_oid}"', "Accept-Ranges": "bytes"}
        if stored.lfs:  # the Hub redirects these to its CDN; served here directly, with the same headers
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(len(stored.content))})
        content, status = stored.content, 200
        wanted = request.headers.get("Range")
        if wanted:
            start, end = _byte_range(wanted, len(content))
            if start > end:
                return Reply(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"})
            content, status = content[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(stored.content)}"
        return Reply(status, content, headers, "application/octet-stream")


def _key(kind: str, repo_id: str) -> str:
    """How `repos` and `commits` name a repository: its id for a model, datasets/<id> for a dataset."""
    return repo_id if kind == "model" else f"{kind}s/{repo_id}"


def _apply(repo: Repo, files: dict[str, StoredFile], key: str, value: dict) -> None:
    """One operation line of a commit, applied to `files`."""
    path = value.get("path", "").strip("/")
    if key == "file":
        content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
        files[path] = StoredFile.of(content, lfs=False)
    elif key == "lfsFile":
        content = repo.lfs_objects.get(value["oid"])
        if content is None:
            raise HubError(422, f"LFS object {value['oid']} for {path} was never uploaded")
        files[path] = StoredFile.of(content, lfs=True)
    elif key == "deletedFile":
        if files.pop(path, None) is None:
            raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
    elif key == "deletedFolder":
        inside = [name for name in files if name.startswith(path + "/")]
        if not inside:
            raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
        for name in inside:
            del files[name]
    else:
        raise HubError(400, f"unknown commit operation '{key}'")


def _listing(repo: Repo, commit: Commit, folder: str, recursive: bool, expand: bool) -> list[dict]:
    """The tree API's entries under `folder` (a file's own entry when `folder` names a file)."""
    prefix = folder + "/" if folder else ""
    folders: set[str] = set()
    entries = []
    for path, stored in sorted(commit.files.items()):
        if path != folder and not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/") if path != folder else [path]
        if not recursive and len(parts) > 1:
            folders.add(prefix + parts[0])
            continue
        folders.update(prefix + "/".join(parts[:depth]) for depth in range(1, len(parts)))
        entry: dict[str, Any] = {"type": "file", "oid": stored.git_oid, "size": len(stored.content), "path": path}
        if stored.lfs:
            entry["lfs"] = {"oid": stored.sha256, "size": len(stored.content), "pointerSize": stored.pointer_size}
        if expand:
            changed = repo.last_change(commit, path)
            entry["lastCommit"] = {"id": changed.sha, "title": changed.title, "date": changed.date}
        entries.append(entry)
    described_folders = [
        {"type": "directory", "oid": hashlib.sha1(name.encode() + commit.sha.encode()).hexdigest(), "size": 0, "path": name}
        for name in sorted(folders)
    ]
    return described_folders + entries


def _byte_range(header: str, size: int) -> tuple[int, int]:
    """First and last byte of a `Range: bytes=...` header (only one range, as the client sends)."""
    first, _, last = header.split("=", 1)[1].split(",")[0].strip().partition("-")
    if not first:  # bytes=-N: the last N bytes
        return max(size - int(last), 0), size - 1
    return int(first), min(int(last), size - 1) if last else size - 1


# ---------------------------------------------------------------------------------------------
# Pointing the client at the server
# ---------------------------------------------------------------------------------------------

# Environment variables huggingface_hub (and transformers, datasets) read: all are replaced so a
# developer's token, cache, offline switch or endpoint never leaks into a test.
HUB_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "HUGGING_FACE_", "TRANSFORMERS_OFFLINE")


def client_env(url: str, home: Path, token: str | None = None) -> dict[str, str]:
    """The variables that point a fresh process's huggingface_hub at `url`, with `home` as HF_HOME."""
    found = {
        "HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home), "HF_HUB_CACHE": str(Path(home) / "hub"),
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    if token:
        found["HF_TOKEN"] = token
    return found


def subprocess_env(url: str, home: Path, token: str | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (os.environ) without any Hub variable, plus `client_env`: for subprocess.run(env=...)."""
    kept = {name: value for name, value in (os.environ if base is None else base).items() if not name.startswith(HUB_ENV_PREFIXES)}
    return {**kept, **client_env(url, home, token)}


def point_client(monkeypatch, url: str, home: Path) -> None:
    """Point this process's huggingface_hub at `url`, logged out, with `home` for cache and token.
    `monkeypatch`: pytest's, which undoes all of it at the end of the test."""
    from huggingface_hub import constants, hf_api

    for name in list(os.environ):
        if name.startswith(HUB_ENV_PREFIXES):
            monkeypatch.delenv(name)
    for name, value in client_env(url, home).items():
        monkeypatch.setenv(name, value)
    # Every path constant derived from HF_HOME at import (caches, token, stored tokens, markers)...
    old_home, new_home = constants.HF_HOME, str(home)
    for name, value in list(vars(constants).items()):
        if isinstance(value, str) and not name.startswith("__") and (value == old_home or value.startswith(old_home + os.sep)):
            monkeypatch.setattr(constants, name, new_home + value[len(old_home):])
    # ...and those an environment variable may have put elsewhere.
    for name, value in {
        "HF_HUB_CACHE": Path(home) / "hub", "HUGGINGFACE_HUB_CACHE": Path(home) / "hub", "HF_ASSETS_CACHE": Path(home) / "assets",
        "HUGGINGFACE_ASSETS_CACHE": Path(home) / "assets", "HF_TOKEN_PATH": Path(home) / "token",
        "HF_STORED_TOKENS_PATH": Path(home) / "stored_tokens", "HF_XET_CACHE": Path(home) / "xet",
    }.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, str(value))
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    # `huggingface_hub.upload_folder` and friends are methods of an HfApi made at import.
    monkeypatch.setattr(hf_api.api, "endpoint", url)


@contextmanager
def client_pointed_at(url: str, home: Path) -> Iterator[None]:
    """`point_client` outside a pytest fixture: undone when the block ends."""
    import pytest

    with pytest.MonkeyPatch.context() as monkeypatch:
        point_client(monkeypatch, url, home)
        yield


@dataclass
class HubFixture:
    """What the `hub` fixture gives a test: the server, alice's token, and this process's client
    pointed at the server (logged out until `login`)."""

    server: HubServer
    home: Path
    monkeypatch: Any
    token: str = ALICE_TOKEN

    @property
    def url(self) -> str:
        return self.server.url

    def env(self, token: bool | str = True, home: Path | None = None) -> dict[str, str]:
        """Environment for a subprocess (the sparsify CLI): HF_TOKEN is alice's (True), none (False) or
        `token`; HF_HOME is this test's (shared with this process) unless `home` is given."""
        chosen = self.token if token is True else (token or None)
        return subprocess_env(self.url, home or self.home, chosen)

    def login(self, token: str | None = None) -> None:
        """In this process, as `hf auth login` or HF_TOKEN would: alice, or the given token."""
        self.monkeypatch.setenv("HF_TOKEN", token or self.token)

    def logout(self) -> None:
        self.monkeypatch.delenv("HF_TOKEN", raising=False)


def serve_for_a_test(monkeypatch, home: Path) -> Iterator[HubFixture]:
    """The `hub` fixture's body: a fresh server with the test users, this process pointed at it; at the
    end, fails the test if a request went unhandled or the server broke."""
    with HubServer(tokens=TEST_TOKENS, orgs=TEST_ORGS) as server:
        point_client(monkeypatch, server.url, home)
        yield HubFixture(server, home, monkeypatch)
    assert not server.unhandled, f"requests the test Hub has no route for: {server.unhandled}"
    assert not server.errors, f"the test Hub broke answering: {server.errors}"

