"""Target ``cpu``: the optimised graph as generated C over hand-written kernels (kernels.c), built
by the system compiler into one shared library per artifact.

- lower.py   graph -> one C function per entry graph (views, loops, kernel calls, arena plan)
- kernels.c  GEMV/GEMM (f32, f16, q8, q4 with int8 activations), norms, embeddings, attention
- layout.py  the weights it stores in its own layout (q4g32 and q8 in panels of eight rows)
- tune.py    the autotuner and its cache (tiles per kernel and shape)
- build.py   the compiler run, cached by content; feature levels
- launch.py  the runtime side: loads the library with ctypes and runs steps
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from llmc import __version__
from llmc.errors import UsageError
from llmc.ir import Graph

from .. import DEFAULT_MAX_TOKENS as CHUNK
from .. import Build, check_chunk, chunk_option
ABI_VERSION = 2        # what the library's llmc_abi() returns: the step's C signature (lower.py)
# What this target keeps in the build cache (llmc cache): cpu/<key>/model.so, cpu/tuning.json, cpu/lib.
CACHE_PARTS = [("cpu libraries and tuning", "cpu")]


QUANT_ACTIVATIONS = ("int8", "f32")      # what quantized linears multiply (Options.quant_activations)


@dataclass(frozen=True)
class Options:
    cpu_level: str | None = field(default=None, metadata={
        "help": "CPU feature level of a cpu build: x86-64-v3 (AVX2/FMA, the default on such machines), "
                "portable (plain C), native (this machine's every feature)",
        "choices": ["x86-64-v3", "portable", "native"]})
    tune: str = field(default="off", metadata={
        "help": "autotune kernel tiles on this machine (results cached per CPU and shape)",
        "choices": ["off", "fast", "full"]})
    chunk: int | None = chunk_option()
    quant_activations: str = field(default="int8", metadata={
        "help": "what quantized linears multiply: int8 (activations rounded per block of 32, as llama.cpp "
                "does; the fast path) or f32 (the exact product with the dequantized weight: perplexity 0.4-0.7 "
                "percent lower on SmolLM2; about half the prefill and 0.3x the decode speed)",
        "choices": list(QUANT_ACTIVATIONS)})


def check(options: Options) -> None:
    check_options(options.cpu_level, options.tune, options.chunk, options.quant_activations)


def check_options(level: str | None, tune: str, chunk: int | None, quant_activations: str = "int8") -> None:
    """Refuse a cpu feature level, tuning mode, prefill chunk or activation format this target does
    not know."""
    from .build import LEVELS
    from .tune import MODES

    if level is not None and level not in LEVELS:
        raise UsageError(f"unknown cpu feature level {level!r}; choose {', '.join(LEVELS)}")
    if tune not in MODES:
        raise UsageError(f"unknown tuning mode {tune!r}; choose {', '.join(MODES)}")
    if quant_activations not in QUANT_ACTIVATIONS:
        raise UsageError(f"unknown activation format {quant_activations!r} for quantized linears; "
                         f"choose {', '.join(QUANT_ACTIVATIONS)}")
    check_chunk(chunk)


def emit(graph: Graph, options: Options, progress=None) -> Build:
    """The lower phase for target cpu: generated C, tuned and built into a shared library."""
    built = compile_graphs({"step": graph}, level=options.cpu_level, tune=options.tune,
                           chunk=options.chunk or CHUNK, progress=progress,
                           exact=options.quant_activations == "f32")
    kernels = ", ".join(f"{k.removeprefix('llmc_')} x{n}" for k, n in built.kernels.items())
    tuning = ", ".join(f"{n} {k}" for k, n in built.tuned.items() if n)
    summary = (f"{built.manifest['level']}: library {len(built.code) / 1e3:.0f} kB; kernels: {kernels}; "
               f"tiles: {tuning or 'none'}")
    return Build({"code": built.code}, built.manifest, built.manifest["chunk"], {"cpu_features": built.requires},
                 summary=summary, weights=built.weights,
                 report={"kernels": built.kernels, "tuning": built.tuned, "library_bytes": len(built.code),
                         "level": built.manifest["level"], "source": built.source_path})


def describe(artifact) -> list[str]:
    target = artifact.manifest["target"]
    kernels = ", ".join(f"{k.removeprefix('llmc_')} x{n}" for k, n in target["kernels"].items())
    lines = [f"cpu       level {target['level']}, up to {target['chunk']} tokens a call, activation arena "
             f"{target['arena_bytes'] / 1e6:.1f} MB; kernels: {kernels}"]
    layouts = target.get("layouts") or {}
    if layouts:
        kinds = sorted(set(layouts.values()))
        lines.append(f"          {len(layouts)} weight parts in the target's own layout ({', '.join(kinds)})")
    return lines


def runs_here(manifest) -> tuple[bool, str | None]:
    from llmc.artifact import ArtifactError, check_machine

    try:
        check_machine(manifest, "the artifact")
    except ArtifactError as exc:
        return False, str(exc)
    return True, None


def check_artifact(artifact) -> None:
    """The manifest's target entry against what the library was built for (expects.py)."""
    from .expects import check_against_library

    check_against_library(artifact.manifest, bytes(artifact.section("code")), artifact.path)


def executor(artifact, threads: int | None = None):
    from .launch import CpuExecutor

    return CpuExecutor(artifact, threads)


@dataclass
class CpuBuild:
    code: bytes                 # the shared library
    manifest: dict              # the artifact's "target" entry
    kernels: dict[str, int]     # kernel -> call sites
    tuned: dict[str, int]       # tuning: measured, cached, default
    source_path: str
    requires: list[str]         # CPU features the library needs
    weights: dict = field(default_factory=dict)     # weights in the target's own layout (layout.py)


def compile_graphs(graphs: dict[str, Graph], *, level: str | None = None, tune: str = "off",
                   features: set[str] | None = None, chunk: int = CHUNK, progress=None,
                   exact: bool = False) -> CpuBuild:
    """Lower ``graphs`` (entry name -> step graph) into one library for this CPU feature level; one
    call takes at most ``chunk`` tokens (the activation arena is planned for that many). ``exact``:
    quantized linears multiply f32 activations by the dequantized weight (no int8 rounding)."""
    from llmc.artifact import host_cpu_features

    from .build import build_shared_library, default_level, level_requirements
    from .expects import c_declaration, expects_of
    from .lower import SiteTable, WeightTable, lower_graph
    from .tune import Tuner

    check_options(level, tune, chunk)
    features = host_cpu_features() if features is None else features
    level = level or default_level(features)
    requires = level_requirements(level, features)
    tuner = Tuner(level, tune, features, progress)
    weights, sites = WeightTable(), SiteTable()
    functions = {name: lower_graph(graph, f"llmc_{name}", weights, tuner.tiles, chunk, sites, exact)
                 for name, graph in graphs.items()}
    kernels: dict[str, int] = {}
    for lowered in functions.values():
        for kernel, count in lowered.kernels.items():
            kernels[kernel] = kernels.get(kernel, 0) + count
    tuner.finish()
    source = "\n".join([
        f"/* Generated by llmc {__version__} for target cpu, level {level}. Do not edit. */",
        "#define LLMC_KERNEL static",
        '#define LLMC_EXPORT __attribute__((visibility("default")))',
        f"#define LLMC_CHUNK {chunk}",
        kernel_constants(),
        _kernels_source(),
        "#include <omp.h>",
        "static int llmc_nthreads = 1;",
        f"LLMC_EXPORT int llmc_abi(void) {{ return {ABI_VERSION}; }}",
        "LLMC_EXPORT void llmc_set_threads(int n) { llmc_nthreads = n > 0 ? n : 1; }",
        "/* the bandwidth probe: a streaming read by the same threads the model runs on; 32 independent",
        "   sums (four vectors) per thread, so the adds keep up with memory */",
        "LLMC_EXPORT double llmc_stream_read(const float* x, int64_t n) {",
        "  double total = 0.0;",
        "  #pragma omp parallel num_threads(llmc_nthreads) reduction(+:total)",
        "  {",
        "    int64_t per = (n / 32 + omp_get_num_threads() - 1) / omp_get_num_threads() * 32;",
        "    int64_t lo = per * omp_get_thread_num(), hi = lo + per < n ? lo + per : n;",
        "    float acc[32] = {0};",
        "    int64_t i = lo;",
        "    for (; i + 32 <= hi; i += 32)",
        "      for (int j = 0; j < 32; j++) acc[j] += x[i + j];",
        "    for (; i < hi; i++) acc[0] += x[i];",
        "    for (int j = 0; j < 32; j++) total += acc[j];",
        "  }",
        "  return total;",
        "}",
        "",
        profile_hooks(sites.labels),
    ] + [lowered.code for lowered in functions.values()])
    arena_bytes = max(lowered.arena_bytes for lowered in functions.values())
    entries = {name: lowered.name for name, lowered in functions.items()}
    source += "\n/* what this library was built for, checked against the manifest before it runs (expects.py) */\n"
    source += c_declaration(expects_of(graphs, weights.names, arena_bytes, chunk, entries)) + "\n"
    code, path = build_shared_library(source, level)
    manifest = {
        "name": "cpu", "executor": "generated C, OpenMP", "level": level, "chunk": chunk,
        "arena_bytes": arena_bytes, "functions": entries,
        "weights": weights.names, "layouts": weights.layouts, "kernels": dict(sorted(kernels.items())),
    }
    return CpuBuild(code, manifest, kernels, tuner.summary(), str(path), requires,
                    laid_out(graphs.values(), weights.panels))


def laid_out(graphs, panels: list[tuple[str, ...]]) -> dict:
    """The weights the generated code reads in panels (layout.py), re-laid out from the graphs'."""
    from .layout import to_panels

    stored = {name: array for graph in graphs for name, array in graph.weights.items()}
    out = {}
    for names in panels:                       # (codes, scales[, mins])
        parts = dict(zip(("q", "scales", "mins"), names))
        panel = to_panels({part: stored[name] for part, name in parts.items()})
        out.update({name: panel[part] for part, name in parts.items()})
    return out


def profile_hooks(labels: list[str]) -> str:
    """The profiler the generated code carries (``LLMC_PROFILE``, launch.py): seconds per site,
    added by the first thread after each op's closing barrier while profiling is on (one
    predictable branch per op when it is off)."""
    names = ",\n  ".join(json.dumps(label) for label in labels)
    return "\n".join([
        f"#define LLMC_SITES {len(labels)}",
        "static int llmc_profiling = 0;",
        "static int64_t llmc_prof_steps = 0;",
        "static double llmc_prof_last = 0.0, llmc_prof_seconds[LLMC_SITES];",
        f"static const char* const llmc_prof_names[LLMC_SITES] = {{\n  {names}}};",
        "#define LLMC_MARK(site) do { if (llmc_profiling) { _Pragma(\"omp master\") { double now_ = omp_get_wtime(); \\",
        "    llmc_prof_seconds[site] += now_ - llmc_prof_last; llmc_prof_last = now_; } } } while (0)",
        "LLMC_EXPORT int llmc_profile_sites(void) { return LLMC_SITES; }",
        "LLMC_EXPORT const char* llmc_profile_name(int i) { return i >= 0 && i < LLMC_SITES ? llmc_prof_names[i] : 0; }",
        "/* turn profiling on or off; either way the counts start again from zero */",
        "LLMC_EXPORT void llmc_profile(int on) {",
        "  llmc_profiling = on != 0; llmc_prof_steps = 0;",
        "  for (int i = 0; i < LLMC_SITES; i++) llmc_prof_seconds[i] = 0.0;",
        "}",
        "/* the seconds of every site so far into seconds[LLMC_SITES]; returns the steps they cover */",
        "LLMC_EXPORT int64_t llmc_profile_read(double* seconds) {",
        "  for (int i = 0; i < LLMC_SITES; i++) seconds[i] = llmc_prof_seconds[i];",
        "  return llmc_prof_steps;",
        "}",
        ""])


def kernel_constants() -> str:
    """The #defines kernels.c takes from the lowering, which sizes buffers with the same values."""
    from .lower import MAX_SPLITS, SPLIT_TOKENS

    return f"#define LLMC_MAX_SPLITS {MAX_SPLITS}\n#define LLMC_SPLIT_TOKENS {SPLIT_TOKENS}"


def _kernels_source() -> str:
    from .build import KERNELS

    return KERNELS.read_text()
