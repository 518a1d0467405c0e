"""Model names -> local directories, downloaded from the Hugging Face Hub into its normal cache.

huggingface_hub does the work (cache layout, progress bars, HF_ENDPOINT / HF_HUB_OFFLINE / HF_TOKEN);
this module picks the few files gpt2kit reads and turns the Hub's exceptions into one-line Gpt2kitErrors.
"""

from __future__ import annotations

import glob
import importlib
import re
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.utils import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from gpt2kit.checkpoints.hf import shard_names, weights_source
from gpt2kit.errors import Gpt2kitError

KNOWN_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
REPO_IDS = {n: f"openai-community/{n}" for n in KNOWN_MODELS[:4]} | {"distilgpt2": "distilbert/distilgpt2"}

# Everything gpt2kit reads from an HF directory; the weights are added separately (see download()).
FILES = ["config.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer.json"]
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
INDEX = {w: w + ".index.json" for w in WEIGHTS}  # a sharded save: the index, whose weight_map names the shards
NEEDED = ("config.json", "vocab.json", "merges.txt")

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
LOCAL_HINT = "pass --model a local directory holding config.json and model.safetensors"


def _network_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 2.x talks through httpx2, 1.x through httpx, 0.x through requests: catch whichever exists.
    errs: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                       ("requests", ("ConnectionError", "Timeout"))):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        errs += [getattr(m, n) for n in names if hasattr(m, n)]
    return tuple(errs)


NETWORK_ERRORS = _network_errors()


# seconds a Hub call may wait for the next byte (and to connect): huggingface_hub's own HTTP client waits
# forever on a server that accepts the connection and never answers
READ_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0
_bounded = False


def bound_timeouts() -> None:
    """Give huggingface_hub's HTTP client (1.x and later; 0.x's requests calls set their own) a read and a
    connect timeout, so that a silent Hub fails with the network error instead of hanging. The read timeout
    is per read: a long download or upload that keeps moving is not cut."""
    global _bounded
    if _bounded:
        return
    _bounded = True
    try:
        from huggingface_hub import set_client_factory  # lazy: 1.x and later only (ImportError below)
        from huggingface_hub.utils._http import default_client_factory  # lazy: likewise
    except ImportError:
        return

    def bound(request) -> None:  # its calls pass timeout=None explicitly: fill in what is None
        t = dict(request.extensions.get("timeout") or {})
        for key, limit in (("connect", CONNECT_TIMEOUT_S), ("read", READ_TIMEOUT_S), ("write", READ_TIMEOUT_S),
                           ("pool", CONNECT_TIMEOUT_S)):
            if t.get(key) is None:
                t[key] = limit
        request.extensions["timeout"] = t

    def factory():
        client = default_client_factory()
        client.event_hooks = {**client.event_hooks, "request": [*client.event_hooks.get("request", []), bound]}
        return client
    set_client_factory(factory)


def repo_id(name: str) -> str:
    """'gpt2' -> 'openai-community/gpt2'; org-prefixed names pass through."""
    return REPO_IDS.get(name, name)


def is_model_name(s: str) -> bool:
    """A known bare name, or an 'org/name' repo id that is not an existing local path."""
    return s in REPO_IDS or (_REPO_ID.fullmatch(s) is not None and not Path(s).expanduser().exists())


def _missing_shards(d: Path) -> list[str] | None:
    """None when `d` has no weights at all; else the shards its index names that are not there (none for a
    single weights file)."""
    src = weights_source(d)
    if src is None:
        return None
    if not src.name.endswith(".index.json"):
        return []
    return [n for n in shard_names(src) if not (d / n).is_file()]


def _complete(d: Path) -> bool:
    try:
        missing = _missing_shards(d)
    except Gpt2kitError:  # a damaged index in the cache: download again
        return False
    return all((d / f).is_file() for f in NEEDED) and missing == []


def download(name: str, revision: str | None = None, cache_dir: str | None = None, force: bool = False,
             endpoint: str | None = None, local_hint: str = LOCAL_HINT) -> Path:
    """The snapshot directory of model `name` (a known name or 'org/name') in huggingface_hub's cache,
    downloading only the files gpt2kit needs. A cached copy is returned without touching the network.
    `local_hint` ends the errors that suggest using a local copy instead (callers word it for their verb)."""
    rid = repo_id(name)
    bound_timeouts()

    def fetch(weights: list[str], local_only: bool = False) -> Path:
        return Path(snapshot_download(rid, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
                                      allow_patterns=[*FILES, *weights], force_download=force,
                                      local_files_only=local_only))

    def fetch_weights(weights: str) -> Path:
        # The single file or, in a sharded repo, the index; then the shards that index names.
        d = fetch([weights, INDEX[weights]])
        if not (d / weights).is_file() and (d / INDEX[weights]).is_file():
            d = fetch([INDEX[weights], *(glob.escape(n) for n in shard_names(d / INDEX[weights]))])
        return d

    if force and constants.HF_HUB_OFFLINE:
        raise Gpt2kitError(f"cannot download '{name}' again: HF_HUB_OFFLINE is set; unset it to download "
                           "(the cached copy, if any, is left as it is)")
    try:
        if force:
            # snapshot_download answers with the cached copy when it cannot reach the Hub, force_download or
            # not: ask the Hub first, so that "download again" fails rather than quietly doing nothing
            HfApi(endpoint=endpoint).repo_info(rid, revision=revision or "main")
        else:
            # Cache first: a model loaded once must load again with no network (and no Hub round-trip).
            try:
                d = fetch([WEIGHTS[0]], local_only=True)
                if _complete(d):
                    return d
            except LocalEntryNotFoundError:
                pass
        d = fetch_weights(WEIGHTS[0])
        if weights_source(d) is None:
            # Older repos carry only the pickle; ask for it only then, so safetensors repos never pay for both.
            d = fetch_weights(WEIGHTS[1])
    except Exception as e:
        err = _hub_error(e, name, revision, local_hint)
        if err is None:
            raise
        raise err from e
    missing = _missing_shards(d)
    if missing is None:
        raise Gpt2kitError(f"model '{name}' on the Hub has neither model.safetensors nor pytorch_model.bin: "
                           f"it is not a GPT-2 checkpoint gpt2kit can load; {local_hint}")
    if missing:
        raise Gpt2kitError(f"model '{name}' on the Hub is incomplete: its shard index names {missing[0]}, which the "
                           f"repository does not have; {local_hint}")
    return d


def resolve(name_or_path: str, revision: str | None = None, flag: str = "--model",
            local_hint: str = LOCAL_HINT) -> Path:
    """An existing local directory as it is; else a model name, downloaded (or found in the cache). `flag`
    and `local_hint` word the errors for the caller's argument."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise Gpt2kitError(f"{flag} {name_or_path} is a file; pass the directory that holds config.json "
                           "and the weights")
    if is_model_name(name_or_path):
        return download(name_or_path, revision=revision, local_hint=local_hint)
    if re.fullmatch(r"[\w-]+", name_or_path):
        # A bare word like 'gpt3' reads as a name more than as a path, so answer for both.
        raise Gpt2kitError(f"'{name_or_path}' is neither a local directory nor a known model name: use one of "
                           f"{', '.join(KNOWN_MODELS)}, a Hub id like 'org/name', or a local directory")
    raise Gpt2kitError(f"no such directory: {name_or_path}; {local_hint}, or a model name such as gpt2")


def _chain(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _hub_error(e: Exception, name: str, revision: str | None, local_hint: str) -> Gpt2kitError | None:
    """One-line Gpt2kitError for a failed download; None for exceptions that are bugs, not user problems."""
    chain = list(_chain(e))

    def find(kind):
        return next((x for x in chain if isinstance(x, kind)), None)

    where = f"https://huggingface.co/{repo_id(name)}"
    if find(GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        return Gpt2kitError(f"model '{name}' is gated on the Hub: accept its terms at {where} and set HF_TOKEN "
                            f"(or run `hf auth login`), or {local_hint}")
    if (x := find(RepositoryNotFoundError)) is not None:
        if getattr(x.response, "status_code", None) == 401:
            # The Hub answers 401 for both missing and private repos when no valid token is sent.
            return Gpt2kitError(f"model '{name}' not found on the Hub (or it is private and no valid token was "
                                f"sent): check the name, set HF_TOKEN for a private model, or {local_hint}")
        return Gpt2kitError(f"model '{name}' not found on the Hub: check the name, or {local_hint}")
    if find(RevisionNotFoundError):
        return Gpt2kitError(f"revision '{revision}' of model '{name}' not found on the Hub: check --revision, "
                            "or leave it out for the main branch")
    if find(OfflineModeIsEnabled):
        return Gpt2kitError(f"cannot download '{name}': HF_HUB_OFFLINE is set and it is not in the local cache: "
                            f"unset HF_HUB_OFFLINE to download it, or {local_hint}")
    if (x := find(HfHubHTTPError)) is not None and getattr(x, "response", None) is not None:
        status = x.response.status_code
        if status == 401:
            return Gpt2kitError(f"the Hub rejected the access token while downloading '{name}' (HTTP 401): "
                                "check HF_TOKEN or run `hf auth login` again")
        if status == 404:
            return Gpt2kitError(f"model '{name}' not found on the Hub: check the name, or {local_hint}")
        return Gpt2kitError(f"cannot download '{name}': the Hugging Face Hub answered HTTP {status}: "
                            f"try again later, or {local_hint}")
    if find(NETWORK_ERRORS) or find(LocalEntryNotFoundError):
        # snapshot_download reports "could not reach the Hub and nothing cached" as LocalEntryNotFoundError.
        return Gpt2kitError(f"cannot download '{name}' from the Hugging Face Hub (no network connection, or no "
                            "answer): "
                            f"connect to the internet, or {local_hint}")
    if find(HFValidationError):
        return Gpt2kitError(f"'{name}' is not a valid Hub model name: use 'org/name' or one of "
                            f"{', '.join(KNOWN_MODELS)}; or {local_hint}")
    if isinstance(e, OSError):
        return Gpt2kitError(f"cannot save '{name}' in the Hugging Face cache ({e.strerror or e}): free some disk "
                            "space, or set HF_HOME to a writable directory with room")
    return None
