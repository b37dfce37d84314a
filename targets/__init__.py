"""Hardware targets, one package each, installed as ``llmc.targets``, and the registry that names
them. A target turns an optimised graph into code, builds it and launches it; it never rewrites
the graph. What targets share: views.py, arena.py, lowering.py, and the cache folder below.

A target package provides (the protocol every ``Target`` entry is a name for):

- ``Options``: a dataclass of the target's build options. Its fields are the build file's keys
  and the manifest's ``options``; ``llmc compile`` takes each as ``--name-with-dashes`` (the
  field's ``metadata`` gives ``help``, ``choices``, ``metavar``).
- ``check(options)``: refuse options the target cannot build with (a UsageError), before tracing.
- ``emit(graph, options, progress) -> Build``: the build: the step graph (``llmc.abi``) as
  sections, the manifest's ``target`` entry, the machine it needs, and what the report shows.
- ``describe(artifact) -> list[str]``: the target's lines of ``llmc inspect``.
- ``runs_here(manifest) -> (bool | None, why)``: whether this machine runs the artifact (None:
  cannot tell), for ``llmc verify``.
- optionally ``check_artifact(artifact)``: refuse (ArtifactError) an artifact whose manifest does
  not match what its code was built for, before any of it runs; ``llmc verify`` and ``llmc
  inspect`` call it after the common checks (``llmc.manifest``, ``llmc.abi.check_manifest``), and
  the target's ``executor`` makes the same checks itself before it runs anything.
- ``executor(artifact, threads)``: the runtime's side, with ``allocate_pool(blocks) -> bytes``
  and ``run(entry, inputs) -> logits`` (optionally ``sample``, ``stream_bandwidth``, and
  ``start_profile`` / ``profile`` for ``LLMC_PROFILE``).
- optionally ``export(artifact, directory) -> [file names]``: the artifact in a standard format of
  the target's own, for ``llmc export`` (the onnx target's model folder).
- optionally ``KV_FORMATS`` (the ``--kv`` formats it builds; default: all), ``DEFAULT_KV`` (the
  one it builds unless told; default: f16 where it builds f16, else its first) and ``CACHE_PARTS``
  ((what, folder) it keeps in the build cache, for ``llmc cache``).

Adding a target is its folder plus one ``register`` line below; nothing outside ``targets/``
names one.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from llmc.errors import UsageError


@dataclass
class Build:
    """What a target's ``emit`` returns."""

    sections: dict[str, bytes]             # the artifact's sections the target adds (code, kernels)
    manifest: dict[str, Any]               # the manifest's "target" entry (with "name")
    max_tokens: int                        # the most tokens one step call takes
    requires: dict[str, list] = field(default_factory=dict)     # e.g. {"cpu_features": [...]}
    pool_dtype: str | None = None          # the KV pool's storage dtype, when not the graph's
    # weights the target stores in its own layout (same name, dtype and shape, bytes reordered;
    # the manifest's target entry says which layout), in place of the graph's
    weights: dict[str, Any] = field(default_factory=dict)
    summary: str = ""                      # the lower phase's progress line, after its time
    report: dict[str, Any] = field(default_factory=dict)        # the compile report's "target"


@dataclass(frozen=True)
class Target:
    """A registry entry: the target's name, a line on what it builds, and the package that
    implements the protocol above (imported when first asked, so heavy imports stay lazy)."""

    name: str
    summary: str
    module: str

    @property
    def package(self):
        return importlib.import_module(self.module)

    @property
    def options(self) -> type:
        return self.package.Options

    def make_options(self, given: Mapping[str, Any]) -> Any:
        """The target's Options from ``given`` (field name -> value; None means the default);
        an option another target takes is refused by name."""
        names = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(k for k, v in given.items() if v is not None and k not in names)
        if unknown:
            owners = {k: [t.name for t in REGISTRY.values() if k in t.option_names()] for k in unknown}
            said = "; ".join(f"{k} is an option of {' and '.join(o) or 'no target'}" for k, o in owners.items())
            raise UsageError(f"target {self.name} takes no option {', '.join(unknown)} ({said}); "
                             f"its options are {', '.join(sorted(names)) or 'none'}")
        options = self.options(**{k: v for k, v in given.items() if v is not None})
        self.package.check(options)
        return options

    @property
    def kv_formats(self) -> tuple[str, ...] | None:
        """The KV cache formats it builds (the package's KV_FORMATS); None: every one llmc has."""
        return getattr(self.package, "KV_FORMATS", None)

    @property
    def default_kv(self) -> str:
        """The KV cache format it builds unless told (the package's DEFAULT_KV; else f16 where it
        builds f16, else its first format)."""
        formats = self.kv_formats
        return getattr(self.package, "DEFAULT_KV", None) or ("f16" if not formats or "f16" in formats else formats[0])

    @property
    def cache_parts(self) -> list[tuple[str, str]]:
        """(what, folder) it keeps in the build cache (the package's CACHE_PARTS)."""
        return list(getattr(self.package, "CACHE_PARTS", []))

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)]

    def build(self, graph, options, progress=None) -> Build:
        return self.package.emit(graph, options, progress)

    def describe(self, artifact) -> list[str]:
        return self.package.describe(artifact)

    def runs_here(self, manifest: Mapping[str, Any]) -> tuple[bool | None, str | None]:
        return self.package.runs_here(manifest)

    def check_artifact(self, artifact) -> None:
        """The target's own checks of an artifact (its manifest entry against its sections and
        code), before any of its code runs; an ArtifactError if they fail."""
        check = getattr(self.package, "check_artifact", None)
        if check is not None:
            check(artifact)

    def executor(self, artifact, threads: int | None):
        return self.package.executor(artifact, threads)

    def export(self, artifact, directory) -> list[str]:
        """Write the artifact in the target's own standalone format into ``directory`` (empty);
        a UsageError for a target without one."""
        export = getattr(self.package, "export", None)
        if export is None:
            exporters = [t.name for t in REGISTRY.values() if hasattr(t.package, "export")]
            raise UsageError(f"a {self.name} artifact has no standalone form to export; "
                             f"{' and '.join(exporters) or 'no target'} artifacts do")
        return export(artifact, directory)


REGISTRY: dict[str, Target] = {}


def register(target: Target) -> Target:
    """Add a target (a later entry of the same name replaces the earlier one)."""
    REGISTRY[target.name] = target
    return target


def get(name: str) -> Target:
    """The registered target ``name``; a UsageError listing the others otherwise."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise UsageError(f"unknown target {name!r}; this llmc builds: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def target_of(manifest: Mapping[str, Any], path: str | Path) -> Target:
    """The target an artifact was built for, or an ArtifactError naming the ones this llmc runs."""
    from llmc.artifact import ArtifactError

    name = manifest.get("target", {}).get("name") if isinstance(manifest.get("target"), dict) else None
    if not isinstance(name, str) or name not in REGISTRY:
        raise ArtifactError(f"{path} was built for target {name!r}; this llmc runs {', '.join(REGISTRY)} artifacts")
    return REGISTRY[name]


def option_type(f: dataclasses.Field) -> type:
    """int or str: what an option field takes on the command line and in a build file."""
    return int if "int" in str(f.type).replace("Optional[", "").replace("]", "").split(" | ") else str


def option_fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Every target option by field name: [(target, field)], for the CLI flags and build-file keys."""
    out: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for target in REGISTRY.values():
        for f in dataclasses.fields(target.options):
            out.setdefault(f.name, []).append((target.name, f))
    return out


DEFAULT = "cpu"             # what ``llmc compile`` builds for unless told


register(Target("cpu", "generated C built into a shared library (AVX2 or portable kernels)", "llmc.targets.cpu"))
register(Target("cuda", "Triton kernels cross-compiled to cubins (no GPU needed to build)", "llmc.targets.cuda"))
register(Target("ref", "the reference interpreter (numpy; portable, slow, the oracle)", "llmc.targets.ref"))
register(Target("onnx", "an ONNX model that ONNX Runtime runs (CPU, or CUDA with onnxruntime-gpu)", "llmc.targets.onnx"))


# ---------------------------------------------------------------------------------------------
# What targets share

def cache_dir() -> Path:
    """The cache folder (``llmc.cache``), for what the runtime keeps there; builds go through
    ``llmc.cache.active()``, which applies the build's cache policy."""
    from llmc.cache import root

    return root()


DEFAULT_MAX_TOKENS = 512    # tokens one step takes unless a build says otherwise; the runtime splits longer prompts


def chunk_option():
    """The ``chunk`` field of a target's Options: the most tokens one step takes."""
    return field(default=None, metadata={
        "help": f"the most tokens one step takes (default {DEFAULT_MAX_TOKENS}); the runtime splits longer prompts",
        "metavar": "TOKENS"})


def check_chunk(chunk) -> None:
    """Refuse a prefill chunk (tokens per call) that is not a positive int."""
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise UsageError(f"the prefill chunk must be a positive number of tokens, not {chunk!r}")


def pool_arrays(artifact, blocks: int):
    """Host (numpy) arrays of a KV pool of ``blocks`` blocks, for a target that keeps it in memory."""
    from llmc import abi

    return abi.allocate_pool(abi.PoolLayout.from_manifest(artifact.manifest), blocks)

