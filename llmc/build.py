"""``llmc build``: every artifact a build file (``llmc.toml``) lists, from one model import.

A build file::

    [model]
    source = "smollm2"          # HF directory or .gguf file (relative to this file), or a built-in name
    context = 2048              # longest sequence the artifacts take (default: the model's own)

    [build]
    output_dir = "dist"         # relative to this file (default: beside it)
    cache = "on"                # cache policy, unless the command line gives one

    [[artifact]]
    name = "smollm2-cpu"        # written to <output_dir>/<name>.llmc
    target = "cpu"
    cpu_level = "x86-64-v3"
    quant = "gguf"

An artifact takes the options of ``llmc compile``: target, quant, kv, calib, block_size, and its
target's options (``llmc.targets``: cpu_level, tune, chunk for cpu; arch, act_dtype, chunk for
cuda). ``quant`` may be a list, one artifact per scheme, when the name holds
``{quant}``. The whole file is checked before anything is built (a UsageError, exit 2); an
artifact that fails to build is reported and the others are still built (exit 1).
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from llmc.artifact import sha256_file
from llmc.errors import LlmcError, UsageError

COMMON_KEYS = {"name": str, "target": str, "quant": (str, list), "kv": str, "calib": str, "block_size": int}
SECTION_KEYS = {"model": {"source": str, "context": int}, "build": {"output_dir": str, "cache": str}}
TYPE_NAMES = {str: "a string", int: "an integer", list: "a list"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass
class ArtifactSpec:
    name: str
    output: Path
    options: dict[str, Any]           # compile_model's keyword arguments

    def describe(self) -> str:
        """The target and the target options the build file gives, e.g. "cpu cpu_level=x86-64-v3"."""
        from llmc.targets import get

        given = [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in self.options.items()
                 if k in get(self.options["target"]).option_names()]
        return " ".join([self.options["target"]] + given)


@dataclass
class BuildFile:
    path: Path
    source: str                       # as written in the file
    source_path: str                  # what to resolve: relative paths made absolute
    context: int | None
    cache: str
    artifacts: list[ArtifactSpec] = field(default_factory=list)


def read_build_file(path: str | Path) -> BuildFile:
    """Parse and check a build file; every problem is a UsageError naming the file and the key."""
    try:
        import tomllib
    except ModuleNotFoundError:                # Python 3.10
        import tomli as tomllib

    from llmc.cache import check_policy
    from llmc.compiler import check_options

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no build file {path}: write an llmc.toml (see the README) or name one") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the build file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None
    _known(data, {"model", "build", "artifact"}, f"{path}")
    for section, keys in SECTION_KEYS.items():
        if not isinstance(data.get(section, {}), dict):
            raise UsageError(f"{path}: [{section}] must be a table")
        _known(data.get(section, {}), set(keys), f"{path} [{section}]")
        for key, kind in keys.items():
            _typed(data.get(section, {}), key, kind, f"{path} [{section}]")
    model, build = data.get("model", {}), data.get("build", {})
    if "source" not in model:
        raise UsageError(f"{path}: [model] needs a source (a model directory, a .gguf file or a built-in name)")
    base = path.resolve().parent
    source = model["source"]
    source_path = str(base / source) if (base / source).exists() else source
    out_dir = base / build.get("output_dir", ".")
    result = BuildFile(path, source, source_path, model.get("context"), build.get("cache", "on"))
    try:
        check_policy(result.cache)
    except UsageError as exc:
        raise UsageError(f"{path} [build]: {exc}") from None
    entries = data.get("artifact")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{path} lists no artifacts: add [[artifact]] tables with a name and a target")
    for index, entry in enumerate(entries, 1):
        where = f"{path} artifact {index}" + (f" ({entry['name']})" if isinstance(entry.get("name"), str) else "")
        keys = artifact_keys()
        _known(entry, set(keys), where)
        for key, kind in keys.items():
            _typed(entry, key, kind, where)
        if "name" not in entry or "target" not in entry:
            raise UsageError(f"{where}: needs a name and a target")
        for spec in _expand(entry, where):
            options = {key: value for key, value in spec.items() if key != "name"}
            if "calib" in options and options["calib"] != "default":
                options["calib"] = str(base / options["calib"])
            try:
                check_options(**{k: v for k, v in options.items() if k != "calib"}, max_seq=result.context)
            except UsageError as exc:
                raise UsageError(f"{where}: {exc}") from None
            result.artifacts.append(ArtifactSpec(spec["name"], out_dir / f"{spec['name']}.llmc", options))
    names = [a.name for a in result.artifacts]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"{path}: artifact names must differ, and {', '.join(repeated)} is used twice")
    return result


def artifact_keys() -> dict[str, Any]:
    """Every key an [[artifact]] table takes, with its TOML type: the common ones and every
    registered target's options."""
    from llmc.targets import option_fields, option_type

    keys = dict(COMMON_KEYS)
    for name, owners in option_fields().items():
        f = owners[0][1]
        keys[name] = (option_type(f), list) if f.metadata.get("many") else option_type(f)
    return keys


def _known(table: dict, keys: set[str], where: str) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(keys))}")


def _typed(table: dict, key: str, kind, where: str) -> None:
    if key in table and (not isinstance(table[key], kind) or isinstance(table[key], bool)):
        names = " or ".join(TYPE_NAMES[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise UsageError(f"{where}: {key} must be {names}, not {table[key]!r}")


def _expand(entry: dict, where: str) -> list[dict]:
    """One artifact per quantization scheme when ``quant`` is a list (the name holds {quant})."""
    quants = entry.get("quant")
    if quants is None or isinstance(quants, str):
        specs = [entry]
    elif not quants or "{quant}" not in entry["name"]:
        raise UsageError(f"{where}: quant lists several schemes, so the name must hold {{quant}} "
                         "(e.g. \"model-{quant}\")")
    else:
        specs = [dict(entry, name=entry["name"].replace("{quant}", str(quant)), quant=quant) for quant in quants]
    for spec in specs:
        if not NAME.fullmatch(spec["name"]):
            raise UsageError(f"{where}: the name {spec['name']!r} must be letters, digits, '.', '_', '+' or '-'")
    return specs


@dataclass
class Built:
    spec: ArtifactSpec
    ok: bool
    seconds: float
    report: Any = None                # llmc.compiler.CompileReport
    sha256: str | None = None
    error: str | None = None

    def cache_hits(self) -> tuple[int, int]:
        counts = (self.report.cache or {}).values() if self.report else []
        hits = sum(c["hits"] for c in counts)
        return hits, hits + sum(c["misses"] for c in counts)

    def as_json(self) -> dict:
        out = {"name": self.spec.name, "path": str(self.spec.output), "target": self.spec.describe(),
               "options": self.spec.options, "ok": self.ok, "seconds": round(self.seconds, 3)}
        if self.report:
            out.update(bytes=self.report.file_bytes, weight_bytes=self.report.weight_bytes, sha256=self.sha256,
                       phases={k: round(v, 3) for k, v in self.report.phases.items()}, cache=self.report.cache)
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class BuildResult:
    file: BuildFile
    built: list[Built]
    import_seconds: float
    import_cache: dict
    seconds: float

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.built)

    def as_json(self) -> dict:
        return {"build_file": str(self.file.path), "ok": self.ok, "seconds": round(self.seconds, 3),
                "model": {"source": self.file.source, "import_seconds": round(self.import_seconds, 3),
                          "cache": self.import_cache},
                "artifacts": [b.as_json() for b in self.built]}


def build(path: str | Path, *, cache: str | None = None, only: list[str] | None = None,
          progress: TextIO | None = sys.stderr) -> BuildResult:
    """Build every artifact of the build file at ``path`` (those named in ``only``, if given)."""
    from llmc.cache import check_policy, using
    from llmc.frontend.sources import resolve
    from llmc.frontend.stored import import_stored

    start = time.perf_counter()
    spec = read_build_file(path)
    policy = cache or spec.cache
    check_policy(policy)
    artifacts = spec.artifacts
    if only:
        missing = sorted(set(only) - {a.name for a in artifacts})
        if missing:
            raise UsageError(f"{spec.path} has no artifact {missing[0]!r}; it lists "
                             f"{', '.join(a.name for a in artifacts)}")
        artifacts = [a for a in artifacts if a.name in only]
    folders = {a.output.parent for a in artifacts}
    for folder in sorted(folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LlmcError(f"cannot create the output folder {folder}: {exc.strerror or exc}") from None
    say = progress.write if progress else (lambda text: None)
    say(f"llmc build {spec.path}: {len(artifacts)} artifact{'s' * (len(artifacts) != 1)} of {spec.source}, "
        f"cache {policy}\n")
    # One import for every artifact; the model is recorded by the name the build file gives it,
    # so the artifacts do not depend on where the build ran.
    import_start = time.perf_counter()
    with using(policy) as store:
        source = replace(resolve(spec.source_path), spec=spec.source)
        imported = import_stored(source, max_seq=spec.context)
    import_seconds = time.perf_counter() - import_start
    say(f"  import {import_seconds:6.2f} s{' (from the cache)' if imported.cached else ''}\n")
    built = []
    for index, artifact in enumerate(artifacts, 1):
        quant = artifact.options.get("quant", "default quant")
        say(f"[{index}/{len(artifacts)}] {artifact.name}: {artifact.describe()}, {quant}"
            f" -> {_shown(artifact.output)}\n")
        built.append(_build_one(imported, artifact, policy, spec.context, progress))
    result = BuildResult(spec, built, import_seconds, store.counts(), time.perf_counter() - start)
    if progress:
        progress.write(summary(result))
        progress.flush()
    return result


def _build_one(imported, artifact: ArtifactSpec, policy: str, context: int | None,
               progress: TextIO | None) -> Built:
    from llmc.compiler import compile_model

    start = time.perf_counter()
    try:
        report = compile_model(imported.copy(), artifact.output, cache=policy, max_seq=context,
                               progress=_Indented(progress) if progress else None, **artifact.options)
    except LlmcError as exc:
        if progress:
            progress.write(f"    error: {exc}\n")
        return Built(artifact, False, time.perf_counter() - start, error=str(exc))
    return Built(artifact, True, time.perf_counter() - start, report, sha256_file(artifact.output))


def summary(result: BuildResult) -> str:
    """The table printed after a build: artifact, target, scheme, size, time, cache hits."""
    rows = [("artifact", "target", "quant", "size", "time", "cache hits")]
    for b in result.built:
        hits, lookups = b.cache_hits()
        quant = b.report.quant if b.ok else b.spec.options.get("quant", "default")
        rows.append((_shown(b.spec.output), b.spec.describe(), quant,
                     f"{b.report.file_bytes / 1e6:.1f} MB" if b.ok else "FAILED", f"{b.seconds:.1f} s",
                     f"{hits}/{lookups}" if b.ok else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    failed = [b for b in result.built if not b.ok]
    done = len(result.built) - len(failed)
    lines.append(f"{done} of {len(result.built)} artifacts built in {result.seconds:.1f} s; the model was imported in "
                 f"{result.import_seconds:.1f} s{' from the cache' if result.import_cache.get('import', {}).get('hits') else ''}"
                 + "".join(f"\nfailed: {b.spec.name}: {b.error}" for b in failed))
    return "\n".join(lines) + "\n"


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when it lies under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class _Indented:
    """A progress stream that indents every line (the compile's phases under the artifact's line)."""

    def __init__(self, stream: TextIO, prefix: str = "    "):
        self.stream, self.prefix, self.at_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in re.split(r"([\n\r])", text):
            if piece in ("\n", "\r"):
                self.at_start = True
            elif piece and self.at_start:
                out.append(self.prefix)
                self.at_start = False
            out.append(piece)
        self.stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()
