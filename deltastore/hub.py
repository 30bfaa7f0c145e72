"""Models and adapters named by Hugging Face Hub id, as `vllm serve org/name` takes
them: a reference that is a local path is that path; an `org/name` that is not is
resolved through `huggingface_hub` (its cache, `HF_HOME` / `HF_HUB_CACHE`,
`HF_HUB_OFFLINE`, and a token from `HF_TOKEN` or `hf auth login`, never from the
command line), at `revision` (a branch, tag or commit; default `main`).

Only what deltaserve reads is fetched: configs, safetensors, tokenizer and
template files (never pickled checkpoints). The snapshot is read where the Hub
cache keeps it; nothing deltaserve writes goes there.

    resolve_ref("org/name", revision=None) -> Path   # the snapshot directory
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from deltastore.sources import SourceError

# org/name: what `vllm serve` takes; each part as the Hub allows (no "--" or "..")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class HubError(SourceError):
    """A Hub id that cannot be resolved (not cached offline, not found, no access)."""


def is_hub_id(ref: str) -> bool:
    """`org/name` as the Hub spells a repository (a local path is checked first)."""
    return bool(_HUB_ID.fullmatch(ref)) and ".." not in ref and "--" not in ref


def hub_cache() -> Path:
    """Where `huggingface_hub` keeps its snapshots (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def offline() -> bool:
    """HF_HUB_OFFLINE, as `huggingface_hub` read it (or as it is now)."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or now


def snapshot_dir(repo_id: str) -> Path:
    """Where the Hub cache keeps `repo_id`'s snapshots (whether or not it is cached)."""
    return hub_cache() / ("models--" + repo_id.replace("/", "--")) / "snapshots"


def resolve_ref(ref: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A model or adapter reference -> a local path: the path itself when it exists,
    else the Hub snapshot of `org/name` at `revision` (downloaded unless offline)."""
    text = str(ref)
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise SourceError(
                f"--revision {revision} applies to a Hub id (org/name); {text} is a local path"
            )
        return path
    if not is_hub_id(text):
        raise SourceError(f"{text}: no such file or directory (nor a Hub id org/name)")
    return fetch(text, revision)


def fetch(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot of `repo_id` at `revision`: from the cache, downloading what is
    missing unless offline. Errors name the id, never a token."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision}" if revision else repo_id
    local = offline()
    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=MODEL_FILES, local_files_only=local
        )
    except LocalEntryNotFoundError as e:
        why = (
            "HF_HUB_OFFLINE is set, so nothing is downloaded"
            if local
            else "and it could not be downloaded"
        )
        raise HubError(
            f"{at}: no local path of that name, and not in the Hugging Face cache "
            f"{hub_cache()} ({why})"
        ) from e
    except GatedRepoError as e:
        raise HubError(f"{at}: a gated repository: accept its terms and set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise HubError(f"{at}: no such repository on the Hub (or private: set HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise HubError(f"{at}: no revision {revision!r} in that repository") from e
    except HfHubHTTPError as e:
        raise HubError(f"{at}: the Hub answered {type(e).__name__}") from e
    except (OSError, ValueError) as e:
        raise HubError(f"{at}: cannot be fetched ({type(e).__name__}: {e})") from e
    return Path(path)


def in_hub_cache(path: Path) -> bool:
    """True for a path inside the Hub cache (a snapshot deltaserve must not write to)."""
    try:
        path.resolve().relative_to(hub_cache().resolve())
    except ValueError:
        return False
    return True
