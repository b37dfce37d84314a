"""``llmc compile``: a model source -> the pipeline -> a .llmc artifact for one target.

Targets: ``cpu``, the optimised graph as generated C built into a shared library
(``llmc.targets.cpu``); ``cuda``, launch plans over Triton kernels cross-compiled to cubins per GPU
arch (``llmc.targets.cuda``); and ``ref``, the optimised graph as IR text run by the numpy reference
interpreter: portable and slow, the oracle the compiled targets are checked against. Every
artifact also carries the IR text, so any of them can be replayed through the interpreter.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from llmc import __version__
from llmc.artifact import sha256_file, write_artifact
from llmc.errors import LlmcError, UsageError

TARGETS = ("cpu", "cuda", "ref")


@dataclass
class CompileReport:
    output: Path
    phases: dict[str, float]
    notes: list[str]
    weight_bytes: int
    file_bytes: int
    seconds: float
    target: dict | None = None      # what the target reports: kernels, tuning, library size
    cache: dict | None = None       # build cache lookups per kind: {"import": {"hits": 1, "misses": 0}, ...}


def decode_weight_bytes(graph) -> int:
    """Bytes of weights one decode step reads: all of each weight, except one row of a table that
    only embedding lookups read."""
    nodes = graph.nodes()
    names = {n.attrs["name"] for n in nodes if n.op == "weight"}
    only_looked_up = set(names)
    for node in nodes:
        for index, i in enumerate(node.inputs):
            if i.op == "weight" and not (node.op in ("embedding", "qembedding") and index != len(node.inputs) - 1):
                only_looked_up.discard(i.attrs["name"])
    total = 0
    for name in names:
        array = graph.weights[name]
        total += array[0].nbytes if name in only_looked_up else array.nbytes
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


def check_options(target: str = "cpu", quant: str = "f32", kv: str = "f32", cpu_level: str | None = None,
                  tune: str = "off", chunk: int | None = None, arch: str | list | None = None, act: str = "f16",
                  cache: str = "on", max_seq: int | None = None) -> None:
    """Refuse options ``compile_model`` cannot build with (a UsageError), before anything is loaded."""
    from llmc.cache import check_policy
    from llmc.pipeline import check_kv
    from llmc.quant import parse_scheme

    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; this llmc builds: {', '.join(TARGETS)}")
    parse_scheme(quant)
    check_kv(kv)
    check_policy(cache)
    if max_seq is not None and (not isinstance(max_seq, int) or isinstance(max_seq, bool) or max_seq < 1):
        raise UsageError(f"the context length must be a positive number of tokens, not {max_seq!r}")
    if target == "cpu":
        from llmc.targets.cpu import check_options as check_cpu

        check_cpu(cpu_level, tune, chunk)
    if target == "cuda":
        from llmc.targets.cuda import check_options as check_cuda
        from llmc.targets.cuda.build import triton_version

        check_cuda(arch, act, chunk, kv)
        triton_version()


def compile_model(source: Any, output: str | Path, *, target: str = "cpu", quant: str = "f32", kv: str = "f32",
                  calib: str | Path | None = None, cpu_level: str | None = None, tune: str = "off",
                  chunk: int | None = None, arch: str | list | None = None, act: str = "f16", cache: str = "on",
                  progress: TextIO | None = sys.stderr, **import_options: Any) -> CompileReport:
    """Build ``output`` from ``source`` (anything ``import_model`` takes, or an already imported
    model), using the build cache under policy ``cache`` (``llmc.cache``: on, off, readonly, refresh)."""
    from llmc.cache import using

    check_options(target, quant, kv, cpu_level, tune, chunk, arch, act, cache, import_options.get("max_seq"))
    folder = Path(output).resolve().parent
    if not folder.is_dir():
        raise LlmcError(f"cannot write {output}: the folder {folder} does not exist")
    with using(cache) as store:
        report = _compile(source, Path(output), target, quant, kv, calib, cpu_level, tune, chunk, arch, act,
                          progress, import_options)
        report.cache = store.counts()
    return report


def _compile(source, output: Path, target, quant, kv, calib, cpu_level, tune, chunk, arch, act, progress,
             import_options) -> CompileReport:
    from llmc.frontend import Imported
    from llmc.frontend.stored import import_stored
    from llmc.frontend.tokenizer import tokenizer_info
    from llmc.ir import Graph
    from llmc.pipeline import run_phases

    start = time.perf_counter()
    imported = source if isinstance(source, Imported) else import_stored(source, **import_options)
    import_seconds = time.perf_counter() - start
    tokenizer = imported.tokenizer or tokenizer_info(imported.source, imported.config)
    calibration = calibration_ids(calib, tokenizer) if calib else None
    # One run of the phases gives both outputs: last-position logits for generation, and logits
    # for every position for Model.logits (evaluation, comparisons).
    prefill = run_phases(imported, progress=progress, logits="both", quant=quant, kv=kv, calibration=calibration,
                         import_seconds=import_seconds, then=("lower",) if target in ("cpu", "cuda") else ())
    if prefill.graph.inputs[0].attrs["name"] != "tokens":
        raise LlmcError("cannot build a generation artifact: " + "; ".join(prefill.notes))
    both = prefill.graph
    graph, everything = (Graph(both.inputs, [out], both.weights, both.name) for out in both.outputs)
    cache = graph.inputs[2].type
    sections = {"graph": str(graph).encode(), "graph_all": str(everything).encode()}
    target_entry, requires, target_report = {"name": target, "executor": "reference interpreter (numpy)"}, [], None
    cuda_arches: list[str] = []
    if target == "cpu":
        lower_start = time.perf_counter()
        built = _build_cpu({"graph": graph, "graph_all": everything}, cpu_level, tune, chunk, progress)
        prefill.timings["lower"] = time.perf_counter() - lower_start
        sections["code"] = built.code
        target_entry, requires = built.manifest, built.requires
        target_report = {"kernels": built.kernels, "tuning": built.tuned, "library_bytes": len(built.code),
                         "level": built.manifest["level"], "source": built.source_path}
    if target == "cuda":
        lower_start = time.perf_counter()
        built = _build_cuda({"graph": graph, "graph_all": everything}, arch, act, chunk, progress)
        prefill.timings["lower"] = time.perf_counter() - lower_start
        sections.update(built.sections)
        target_entry, cuda_arches = built.manifest, built.manifest["arches"]
        target_report = {"kernels": built.kernels, "arches": cuda_arches, "compiled": built.compiled,
                         "cached": built.cached}
    manifest = {
        "llmc_version": __version__,
        "target": target_entry,
        "requires": {"cpu_features": requires, "cuda_arches": cuda_arches},
        "model": {"source": str(imported.source.spec), "kind": imported.source.kind, "config": imported.config,
                  "max_seq": imported.max_seq},
        "inputs": imported.source.hashes(),
        "quantization": quant + (" (calibrated)" if calib else ""),
        "calibration": _calibration_entry(calib, calibration),
        # What the build was asked for, so `llmc verify` can say how the artifact was made.
        "options": {"target": target, "quant": quant, "kv": kv, "cpu_level": cpu_level, "tune": tune,
                    "chunk": chunk, "arch": arch if arch is None or isinstance(arch, str) else ",".join(arch),
                    "act_dtype": act if target == "cuda" else None, "context": import_options.get("max_seq")},
        # Entry points over the KV cache that the runtime owns; arguments in call order.
        "entry_points": {
            "prefill": {"inputs": [["tokens", "i64[seq]"], ["start_pos", "i64[]"]],
                        "outputs": [["logits", "f32[1, vocab]"]], "graph": "graph"},
            "decode": {"inputs": [["tokens", "i64[1]"], ["start_pos", "i64[]"]],
                       "outputs": [["logits", "f32[1, vocab]"]], "graph": "graph"},
            "logits": {"inputs": [["tokens", "i64[seq]"], ["start_pos", "i64[]"]],
                       "outputs": [["logits", "f32[seq, vocab]"]], "graph": "graph_all"},
        },
        # The cache inputs after tokens and start_pos, in call order; the runtime allocates them.
        "kv_cache": {"layers": cache.shape[0], "kv_heads": cache.shape[1], "head_dim": cache.shape[3],
                     "dtype": cache.dtype, "layout": "[layers, kv_heads, ctx, head_dim]",
                     "inputs": [[n.attrs["name"], str(n.type)] for n in graph.inputs[2:]]},
        "vocab_size": graph.outputs[0].type.shape[-1],
        "decode_weight_bytes": decode_weight_bytes(graph),
        "tokenizer": tokenizer.manifest() if tokenizer.tokenizer_json else None,
        "eos_token_ids": tokenizer.eos_token_ids,
        "notes": prefill.notes,
    }
    if tokenizer.tokenizer_json:
        sections["tokenizer"] = tokenizer.tokenizer_json.encode()
    used = {n.attrs["name"]: n.type.dtype for n in both.nodes() if n.op == "weight"}
    weights = {name: both.weights[name] for name in sorted(used)}
    write_artifact(output, manifest, sections, weights, used)
    seconds = time.perf_counter() - start
    return CompileReport(Path(output), prefill.timings, prefill.notes, sum(w.nbytes for w in weights.values()),
                         Path(output).stat().st_size, seconds, target_report)


def _calibration_entry(calib, ids) -> dict | None:
    """The calibration text by name and content (not by path: the artifact must not depend on
    where the text lay)."""
    if not calib:
        return None
    path = calibration_path(calib)
    return {"text": "default" if str(calib) == "default" else path.name,
            "sha256": sha256_file(path), "tokens": int(len(ids))}


def _build_cpu(graphs, level, tune, chunk, progress):
    """The lower phase for target cpu: generated C, tuned and built into a shared library."""
    from llmc.targets.cpu import CHUNK, compile_graphs

    start = time.perf_counter()
    built = compile_graphs(graphs, level=level, tune=tune, chunk=chunk or CHUNK, progress=progress)
    if progress:
        sites = sum(built.kernels.values())
        progress.write(f"[6/6] lower     {time.perf_counter() - start:6.2f} s  cpu {built.manifest['level']}: "
                       f"{sites} kernel calls, library {len(built.code) / 1e3:.0f} kB\n")
        progress.flush()
    return built


def _build_cuda(graphs, arch, act, chunk, progress):
    """The lower phase for target cuda: launch plans, their kernels cross-compiled per arch."""
    from llmc.targets.cuda import CHUNK, compile_graphs

    start = time.perf_counter()
    built = compile_graphs(graphs, arches=arch, act=act, chunk=chunk or CHUNK, progress=progress)
    if progress:
        size = sum(len(v) for k, v in built.sections.items() if k.startswith("cubin_"))
        progress.write(f"[6/6] lower     {time.perf_counter() - start:6.2f} s  cuda {','.join(built.manifest['arches'])}: "
                       f"{sum(built.kernels.values())} launches per decode step, {built.compiled} kernels compiled, "
                       f"{built.cached} cached, cubins {size / 1e3:.0f} kB\n")
        progress.flush()
    return built
