"""``llmc compile``: a model source -> the pipeline -> a .llmc artifact for one target.

The target is an entry of the registry (``llmc.targets``): it checks its own options, turns the
optimised step graph into its sections (``build``) and names what it needs to run. Every artifact
also carries the step graph as IR text, so any of them can be replayed through the interpreter,
and declares its entry point and KV pool (``llmc.abi``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from llmc import __version__, abi
from llmc.artifact import check_output, sha256_file, write_artifact
from llmc.errors import LlmcError, UsageError


@dataclass
class CompileReport:
    output: Path
    phases: dict[str, float]
    notes: list[str]
    weight_bytes: int
    file_bytes: int
    seconds: float
    target: dict | None = None      # what the target reports: kernels, tuning, library size
    summary: str = ""               # the target's one line on what it built
    cache: dict | None = None       # build cache lookups per kind: {"import": {"hits": 1, "misses": 0}, ...}
    quant: str = "f32"              # the scheme and KV cache format built (defaults resolved)
    kv: str = "f32"
    defaults: dict[str, str] = field(default_factory=dict)    # option -> why: the defaults llmc chose


def decode_weight_bytes(graph) -> int:
    """Bytes of weights one decode step reads: all of each weight, except one row of a table that
    only embedding lookups read, and top_k of the experts of a routed (moe) block's expert weights."""
    nodes = graph.nodes()
    names = {n.attrs["name"] for n in nodes if n.op == "weight"}
    only_looked_up = set(names)
    routed: dict[str, float] = {}                 # expert weight -> the share of it a token reads
    for node in nodes:
        for index, i in enumerate(node.inputs):
            if i.op != "weight":
                continue
            if node.op in ("moe", "qmoe") and index >= 2:
                routed[i.attrs["name"]] = node.attrs["top_k"] / node.attrs["experts"]
            elif not (node.op in ("embedding", "qembedding") and index != len(node.inputs) - 1):
                only_looked_up.discard(i.attrs["name"])
    total = 0
    for name in names:
        array = graph.weights[name]
        if name not in only_looked_up:              # read whole by some op
            total += array.nbytes
        elif name in routed:                        # read by moe blocks only: top_k of E experts
            total += int(array.nbytes * routed[name])
        else:                                       # read by embedding lookups only: a row
            total += array[0].nbytes
    return total


DEFAULT_CALIBRATION = Path(__file__).parent / "data" / "calibration.txt"
CALIBRATION_TOKENS = 512


def calibration_path(calib: str | Path) -> Path:
    """The calibration text's file: ``"default"`` is the public-domain text shipped with llmc."""
    return DEFAULT_CALIBRATION if str(calib) == "default" else Path(calib)


def calibration_ids(calib: str | Path, tokenizer) -> np.ndarray:
    """Token ids of the calibration text (``"default"``: the public-domain text shipped with llmc),
    read with the model's tokenizer (a ``TokenizerInfo``)."""
    from tokenizers import Tokenizer

    path = calibration_path(calib)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LlmcError(f"cannot read the calibration text {path}: {exc}") from None
    if not tokenizer.tokenizer_json:
        raise LlmcError("calibration needs the model's tokenizer to read the text, and this source has none")
    ids = Tokenizer.from_str(tokenizer.tokenizer_json).encode(text, add_special_tokens=False).ids[:CALIBRATION_TOKENS]
    if len(ids) < 16:
        raise LlmcError(f"the calibration text {path} is too short ({len(ids)} tokens); give a few paragraphs")
    return np.asarray(ids, np.int64)


def check_options(target: str | None = None, quant: str | None = None, kv: str | None = None, cache: str = "on",
                  max_seq: int | None = None, block_size: int | None = None, **target_options: Any):
    """Refuse options ``compile_model`` cannot build with (a UsageError), before anything is loaded;
    the target's checked Options otherwise. A quant or kv of None is the default (``defaults``)."""
    from llmc import targets
    from llmc.cache import check_policy
    from llmc.pipeline import check_block_size, check_kv
    from llmc.quant import parse_scheme

    entry = targets.get(target or targets.DEFAULT)
    if quant is not None:
        parse_scheme(quant)
    if kv is not None:
        check_kv(kv)
    check_policy(cache)
    check_block_size(block_size)
    if max_seq is not None and (not isinstance(max_seq, int) or isinstance(max_seq, bool) or max_seq < 1):
        raise UsageError(f"the context length must be a positive number of tokens, not {max_seq!r}")
    options = entry.make_options(target_options)
    formats = entry.kv_formats
    if formats and kv is not None and kv not in formats:
        raise UsageError(f"target {entry.name} has no {kv} KV cache; build it with --kv {' or '.join(formats)}")
    return options


def defaults(entry, source_kind: str | None, quant: str | None, kv: str | None) -> tuple[str, str, dict[str, str]]:
    """(quant, kv, the defaults chosen with why): fast unless told otherwise. A GGUF source keeps
    its own quantized blocks (--quant gguf: lossless, a fraction of f32's bytes), others stay f32;
    the KV cache is the target's default format (f16 where the target has it: half f32's bytes)."""
    chosen = {}
    if quant is None:
        quant = "gguf" if source_kind == "gguf" else "f32"
        chosen["quant"] = "a GGUF source keeps its quantized blocks" if quant == "gguf" else "the source's weights"
    if kv is None:
        kv = entry.default_kv
        chosen["kv"] = "half the bytes of f32" if kv == "f16" else f"target {entry.name}'s format"
    return quant, kv, chosen


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(target options, import options) of compile_model's keyword arguments: a name some target
    declares is a target option."""
    from llmc.targets import option_fields

    names = option_fields()
    return ({k: v for k, v in options.items() if k in names}, {k: v for k, v in options.items() if k not in names})


def compile_model(source: Any, output: str | Path, *, target: str | None = None, quant: str | None = None,
                  kv: str | None = None, calib: str | Path | None = None, block_size: int | None = None,
                  cache: str = "on", progress: TextIO | None = sys.stderr, **options: Any) -> CompileReport:
    """Build ``output`` from ``source`` (anything ``import_model`` takes, or an already imported
    model) for ``target``, using the build cache under policy ``cache`` (``llmc.cache``: on, off,
    readonly, refresh). ``quant`` and ``kv`` default to what runs fast (``defaults``: a GGUF
    source's own blocks, an f16 KV cache on cpu); the report says which it chose. ``options`` are
    the target's options (``llmc.targets``: e.g. cpu_level, tune, chunk for cpu; arch, act_dtype,
    chunk for cuda) and the importer's (max_seq, ...)."""
    from llmc.cache import using

    from llmc import targets

    target = target or targets.DEFAULT
    given, import_options = split_options(options)
    target_options = check_options(target, quant, kv, cache, import_options.get("max_seq"), block_size, **given)
    if quant is None and calib:
        raise UsageError("--calib sets the scales of quantized weights: name the scheme with --quant "
                         "(q8, q4g32 or q4g128)")
    check_output(output)            # before the work, not after it
    with using(cache) as store:
        report = _compile(source, Path(output), target, target_options, quant, kv, calib, block_size, progress,
                          import_options)
        report.cache = store.counts()
    return report


def _compile(source, output: Path, target: str, options, quant, kv, calib, block_size, progress,
             import_options) -> CompileReport:
    from llmc import targets
    from llmc.frontend import Imported
    from llmc.frontend.stored import import_stored
    from llmc.frontend.tokenizer import tokenizer_info
    from llmc.pipeline import run_phases

    entry = targets.get(target)
    start = time.perf_counter()
    imported = source if isinstance(source, Imported) else import_stored(source, **import_options)
    import_seconds = time.perf_counter() - start
    quant, kv, chosen = defaults(entry, imported.source.kind, quant, kv)
    tokenizer = imported.tokenizer or tokenizer_info(imported.source, imported.config)
    calibration = calibration_ids(calib, tokenizer) if calib else None
    result = run_phases(imported, progress=progress, block_size=block_size, quant=quant, kv=kv,
                        calibration=calibration, import_seconds=import_seconds, then=("lower",))
    if result.graph.inputs[0].attrs["name"] != "tokens":
        raise LlmcError("cannot build a generation artifact: " + "; ".join(result.notes))
    graph = result.graph
    lower_start = time.perf_counter()
    built = entry.build(graph, options, progress)
    result.timings["lower"] = time.perf_counter() - lower_start
    if progress:
        total = len(result.timings)
        progress.write(f"[{total}/{total}] lower     {result.timings['lower']:6.2f} s  {target}"
                       f"{': ' + built.summary if built.summary else ''}\n")
        progress.flush()
    sections = dict(built.sections, graph=str(graph).encode())
    manifest = {
        "llmc_version": __version__,
        "target": built.manifest,
        "requires": built.requires,
        "model": {"source": str(imported.source.spec), "kind": imported.source.kind, "config": imported.config,
                  "max_seq": imported.max_seq},
        "inputs": imported.source.hashes(),
        "quantization": quant + (" (calibrated)" if calib else ""),
        "calibration": _calibration_entry(calib, calibration),
        # What the build was asked for, so `llmc verify` can say how the artifact was made.
        "options": {"target": target, "quant": quant, "kv": kv, "block_size": block_size,
                    "context": import_options.get("max_seq"), **asdict(options)},
        **abi.declare(graph, built.max_tokens, built.pool_dtype),
        "vocab_size": graph.outputs[0].type.shape[-1],
        "decode_weight_bytes": decode_weight_bytes(graph),
        "tokenizer": tokenizer.manifest() if tokenizer.tokenizer_json else None,
        "eos_token_ids": tokenizer.eos_token_ids,
        "notes": result.notes,
    }
    if tokenizer.tokenizer_json:
        sections["tokenizer"] = tokenizer.tokenizer_json.encode()
    used = {n.attrs["name"]: n.type.dtype for n in graph.nodes() if n.op == "weight"}
    weights = {name: built.weights.get(name, graph.weights[name]) for name in sorted(used)}
    write_artifact(output, manifest, sections, weights, used)
    seconds = time.perf_counter() - start
    return CompileReport(Path(output), result.timings, result.notes, sum(w.nbytes for w in weights.values()),
                         Path(output).stat().st_size, seconds, built.report, summary=built.summary, quant=quant,
                         kv=kv, defaults=chosen)


def _calibration_entry(calib, ids) -> dict | None:
    """The calibration text by name and content (not by path: the artifact must not depend on
    where the text lay)."""
    if not calib:
        return None
    path = calibration_path(calib)
    return {"text": "default" if str(calib) == "default" else path.name,
            "sha256": sha256_file(path), "tokens": int(len(ids))}
