"""The build cache: content-addressed entries in one folder, and the policy a build uses it under.

The folder is ``$LLMC_CACHE_DIR``, else ``$XDG_CACHE_HOME/llmc``, else ``~/.cache/llmc``. Every
entry is named by a hash of everything that decides its content, so an entry is never stale,
only unused::

    import/<key>.llmc        traced and imported graphs, with config and tokenizer (llmc.frontend.stored)
    <target>/...             what each target keeps: its libraries, kernels and tuning tables (each
                             target package's CACHE_PARTS says what and where)

The policy (``llmc compile/build --cache``):

    on        use entries and store new ones (the default)
    off       neither: everything is built afresh in a scratch folder that is removed afterwards
    readonly  use entries, store nothing (a shared or restored cache that must stay as it is)
    refresh   ignore entries, build everything and store the results over the old ones

Runtime files (a loaded library, emulated kernels) live in the same folder but are not build
entries: ``root()`` gives the folder whatever the policy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llmc.errors import LlmcError, UsageError

POLICIES = {"on": (True, True), "off": (False, False), "readonly": (True, False), "refresh": (False, True)}


def root() -> Path:
    """The cache folder."""
    if os.environ.get("LLMC_CACHE_DIR"):
        return Path(os.environ["LLMC_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "llmc"


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise UsageError(f"unknown cache policy {policy!r}; choose {', '.join(POLICIES)}")


class BuildCache:
    """The cache as one build sees it: where to look entries up, where new ones go, and what was
    found (``hits``) or built (``misses``), counted per kind of entry."""

    def __init__(self, policy: str = "on", folder: Path | None = None):
        check_policy(policy)
        self.policy = policy
        self.folder = Path(folder) if folder else root()
        self.reads, self.writes = POLICIES[policy]
        self.hits: Counter = Counter()
        self.misses: Counter = Counter()
        self._scratch: Path | None = None

    def lookup(self, kind: str, path: Path) -> Path | None:
        """``path`` (under the cache folder) if the policy reads entries and it exists; counts the
        lookup as a hit or a miss of ``kind``."""
        found = self.reads and path.exists()
        self.record(kind, found)
        return path if found else None

    def record(self, kind: str, hit: bool) -> None:
        (self.hits if hit else self.misses)[kind] += 1

    def entry(self, *parts: str) -> Path:
        """Where the entry named by ``parts`` is looked up."""
        return self.folder.joinpath(*parts)

    def home(self, *parts: str) -> Path:
        """Where a new entry named by ``parts`` goes: the cache folder when the policy stores
        entries, else a scratch folder removed when the build ends."""
        return (self.folder if self.writes else self.scratch()).joinpath(*parts)

    def scratch(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="llmc-build-"))
        return self._scratch

    def counts(self) -> dict[str, dict[str, int]]:
        """{kind: {"hits": n, "misses": n}} for every kind looked up."""
        return {kind: {"hits": self.hits[kind], "misses": self.misses[kind]}
                for kind in sorted(set(self.hits) | set(self.misses))}

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


_active: list[BuildCache] = []


def active() -> BuildCache:
    """The cache of the build in progress; outside one, a default cache (policy on) per call."""
    return _active[-1] if _active else BuildCache("on")


@contextmanager
def using(policy: str = "on", folder: Path | None = None) -> Iterator[BuildCache]:
    """Run a build under ``policy``; yields the BuildCache whose counts the build reports."""
    cache = BuildCache(policy, folder)
    _active.append(cache)
    try:
        yield cache
    finally:
        _active.pop()
        cache.close()


def parts() -> list[tuple[str, str]]:
    """What ``llmc cache`` lists: (what, folder under the cache): the imports, then what each
    registered target keeps."""
    from llmc.targets import REGISTRY

    return [("imported models", "import")] + [part for target in REGISTRY.values() for part in target.cache_parts]


def usage(folder: Path | None = None) -> list[dict]:
    """[{"what", "path", "files", "bytes"}] for each part of the cache."""
    base = Path(folder) if folder else root()
    out = []
    for what, relative in parts():
        path = base / relative
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
        out.append({"what": what, "path": str(path), "files": len(files),
                    "bytes": sum(f.stat().st_size for f in files)})
    return out


def clear(folder: Path | None = None) -> None:
    """Delete every entry (the whole cache folder)."""
    base = Path(folder) if folder else root()
    if base.exists():
        try:
            shutil.rmtree(base)
        except OSError as exc:
            raise LlmcError(f"cannot clear the cache {base}: {exc.strerror or exc}") from None


def replace_folder(work: Path, final: Path, cache: BuildCache) -> None:
    """Move a finished entry folder into place. An entry already there is replaced when the policy
    ignores entries (refresh); otherwise another process stored it meanwhile, and it is kept (it
    holds the same bytes, and that process may be reading it)."""
    if final.exists() and cache.reads:
        shutil.rmtree(work, ignore_errors=True)
        return
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        try:
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    try:
        work.rename(final)
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
