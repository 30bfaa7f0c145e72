"""Fine-tunes named by reference: vLLM's runtime `load_lora_adapter`, an admin upload
by reference, and `--lora-modules` at start.

A runtime reference may only read inside the directories the operator allows
(`--adapter-roots`). Confinement is decided on the real path: `..` is refused
outright, every symlink is resolved before the check (the directory's own and each
file's inside it), and a refusal says nothing of the filesystem (not whether the
path exists, nor where a link points). A Hub id is allowed when the Hub cache is
one of the roots; its snapshot is then checked like any other directory.

The reference is compressed with `recommend`'s defaults (deltastore.auto) off the
event loop and committed like an upload.
"""

from __future__ import annotations

import logging
from pathlib import Path

from deltastore.auto import stamp, to_delta
from deltastore.format import save_delta
from deltastore.hub import fetch, hub_cache, is_hub_id, resolve_ref
from deltastore.sources import ModelSource, SourceError, open_model
from deltastore.store import DeltaStore
from server.config import Settings

log = logging.getLogger(__name__)
LORA_MODULES_SOURCE = "lora-modules:"  # what a --lora-modules variant records as its source


class Forbidden(Exception):
    """A reference outside the allowed roots (the message never says more)."""

    OUTSIDE = "the path is not within the directories this server allows (--adapter-roots)"
    OFF = "loading by path is off: start the server with --adapter-roots DIR"

    def __init__(self, message: str = OUTSIDE) -> None:
        super().__init__(message)


class NotFound(Exception):
    """An allowed reference that holds nothing."""


def _within(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def _real_roots(roots: list[Path]) -> list[Path]:
    return [r.expanduser().resolve() for r in roots]


def confine(ref: str, roots: list[Path], revision: str | None = None) -> Path:
    """The real path `ref` names, if it and every file in it lie within `roots`;
    Forbidden otherwise (or when there are no roots, or `ref` is no path at all: a
    NUL byte, too long, an unknown user's ~). NotFound for an allowed path that does
    not exist."""
    try:
        return _confine(ref, roots, revision)
    except (OSError, ValueError, RuntimeError) as e:
        if isinstance(e, SourceError):
            raise
        raise Forbidden from None


def _confine(ref: str, roots: list[Path], revision: str | None) -> Path:
    real_roots = _real_roots(roots)
    given = Path(ref).expanduser()
    if not real_roots:
        raise Forbidden(Forbidden.OFF)
    if not ref or ".." in given.parts:
        raise Forbidden
    real = (given if given.is_absolute() else Path.cwd() / given).resolve()
    if not real.exists() and is_hub_id(ref):
        if not _within(hub_cache().resolve(), real_roots):
            raise Forbidden
        try:
            real = fetch(ref, revision).resolve()
        except SourceError as e:
            raise NotFound(str(e)) from None
    elif revision is not None:
        raise SourceError("a revision applies to a Hub id, not to a path")
    if not _within(real, real_roots):
        raise Forbidden
    if not real.exists():
        raise NotFound(f"No adapter found for {ref}")
    if real.is_dir():
        for p in real.rglob("*"):  # a link inside that points out is refused too
            if not _within(p.resolve(), real_roots):
                raise Forbidden
    return real


def make_upload(store: DeltaStore, base: ModelSource, path: Path, source: str) -> Path:
    """The reference's delta (recommend's defaults) written to a new upload file of
    the store, ready to validate and commit; removed again if making it fails."""
    upload = store.new_upload()
    try:
        save_delta(upload, to_delta(base, path, source))
    except BaseException:
        upload.unlink(missing_ok=True)
        raise
    return upload


def install_lora_modules(settings: Settings, base_dir: Path, store: DeltaStore) -> list[str]:
    """Compress each --lora-modules entry into the store, once: an entry whose store
    file came from the same reference with the same content is kept; one that came
    from --lora-modules with other content is replaced; a variant of that name from
    anywhere else is left alone (with a warning). Returns the names (re)made."""
    made = []
    base = open_model(base_dir)
    for name, ref in settings.lora_module_refs():
        path = resolve_ref(ref)
        source = f"{LORA_MODULES_SOURCE}{ref}@{stamp(path)}"
        if store.exists(name):
            was = store.meta(name).source
            if was == source:
                continue
            if not was.startswith(f"{LORA_MODULES_SOURCE}{ref}@"):
                log.warning(
                    "--lora-modules %s=%s: the store already has a variant %r from elsewhere "
                    "(%r); it is kept and served",
                    name,
                    ref,
                    name,
                    was,
                )
                continue
        upload = make_upload(store, base, path, source)
        try:
            store.commit(name, upload, replace=True)
        finally:
            upload.unlink(missing_ok=True)
        made.append(name)
        log.info("--lora-modules: %r from %s compressed into %s", name, ref, store.root)
    return made
