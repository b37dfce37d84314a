"""Target ``cuda``: the optimised graph as launch plans over Triton kernels, cross-compiled to cubins
for each requested GPU architecture on any machine (no GPU, no driver).

- kernels.py      hand-written Triton kernels: GEMV/GEMM (float, q8, q4), norms, RoPE, attention,
                  sampling
- elementwise.py  generated Triton kernels for elementwise ops and fused chains
- lower.py        step graph -> launch plans (kernel, grid rule, arguments), arena planned by liveness
- tuning.py       block sizes, warps and stages per arch
- build.py        Triton cross-compilation to cubins, cached by content
- plan.py         the runtime side of a plan: a batch staged for the device, the plan it runs,
                  arguments and grids evaluated per call
- driver.py       the CUDA driver API through ctypes
- launch.py       the executor: cubins loaded, weights and the KV pool on the device, decode
                  batches as CUDA graphs captured per batch-size bucket (no torch, no Triton)
- emulate.py      the same plans run kernel by kernel by Triton's interpreter on CPU (tests)

An artifact holds, per arch, every kernel's cubin and launch metadata (section ``cubin_sm<NN>``
and the plan section), and the kernels' Triton source (section ``cuda_src``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from llmc.errors import UsageError
from llmc.ir import Graph

from .. import DEFAULT_MAX_TOKENS as CHUNK
from .. import check_chunk, chunk_option

MAX_DECODE_BATCH = 64       # the most sequences a captured decode graph takes (its arena holds their splits)
ARCHES = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}
ACT_DTYPES = ("f16", "bf16")
DEFAULT_ARCHES = "sm_80,sm_90"


def parse_arches(text: str | list | None) -> list[int]:
    """``"sm_80,sm_90"`` -> [80, 90] (sorted, no repeats); unknown names are refused."""
    names = text if isinstance(text, (list, tuple)) else (text or DEFAULT_ARCHES).split(",")
    out = set()
    for name in names:
        name = str(name).strip()
        if name not in ARCHES:
            raise UsageError(f"unknown cuda arch {name!r}; choose from {', '.join(ARCHES)} (comma-separated)")
        out.add(ARCHES[name])
    return sorted(out)


# What this target keeps in the build cache (llmc cache), under cuda/.
CACHE_PARTS = [("cuda kernels", "cuda/kernels"), ("cuda tuning table", "cuda/tuning.json"),
               ("Triton's cache", "cuda/triton"), ("runtime files", "cuda/emulate"), ("kernel sources", "cuda/src")]
KV_FORMATS = ("f32",)       # no int8 KV yet: the pool is kept in the activation dtype


@dataclass(frozen=True)
class Options:
    arch: str | None = field(default=None, metadata={
        "help": f"GPU archs of a cuda build, comma-separated: {', '.join(ARCHES)} (default {DEFAULT_ARCHES})",
        "metavar": "ARCHES", "many": True})
    act_dtype: str = field(default="f16", metadata={
        "help": "activation and KV cache dtype of a cuda build (fp32 accumulation either way)",
        "choices": list(ACT_DTYPES)})
    chunk: int | None = chunk_option()

    def __post_init__(self):
        if isinstance(self.arch, (list, tuple)):          # a build file's list: recorded as the flag's text
            object.__setattr__(self, "arch", ",".join(map(str, self.arch)))


def check(options: Options) -> None:
    from .build import triton_version

    check_options(options.arch, options.act_dtype, options.chunk)
    triton_version()


def emit(graph: Graph, options: Options, progress=None):
    """The lower phase for target cuda: launch plans, their kernels cross-compiled per arch."""
    from .. import Build

    built = compile_graphs({"step": graph}, arches=options.arch, act=options.act_dtype,
                           chunk=options.chunk or CHUNK, progress=progress)
    size = sum(len(v) for k, v in built.sections.items() if k.startswith("cubin_"))
    arches = built.manifest["arches"]
    summary = (f"{','.join(arches)}: {sum(built.kernels.values())} launches per decode step, {built.compiled} "
               f"kernels compiled, {built.cached} cached, cubins {size / 1e3:.0f} kB")
    return Build(built.sections, built.manifest, built.manifest["max_tokens"],
                 {"cuda_arches": arches}, pool_dtype=built.manifest["kv_dtype"], summary=summary,
                 report={"kernels": built.kernels, "arches": arches, "compiled": built.compiled,
                         "cached": built.cached})


def describe(artifact) -> list[str]:
    target = artifact.manifest["target"]
    plan = json.loads(bytes(artifact.section("cuda_plan")).decode())
    launches = ", ".join(f"{k} x{n}" for k, n in target["decode_launches"].items())
    lines = [f"cuda      activations and KV cache {target['act_dtype']}, up to {target['chunk']} tokens a call, "
             f"activation arena {target['arena_bytes'] / 1e6:.1f} MB; a decode step launches {launches}"]
    for arch in target["arches"]:
        cubins = plan["cubins"][arch]
        size = len(artifact.section(f"cubin_sm{arch[3:]}"))
        lines.append(f"cubins    {arch}: {len(cubins)} kernels, {size / 1e3:.0f} kB")
        for key in sorted(cubins):
            entry, meta = plan["kernels"][key], cubins[key]
            params = ", ".join(f"{k}={v}" for k, v in sorted(entry["constexprs"].items()))
            lines.append(f"            {meta['name']:<28} {meta['num_warps']} warps, {meta['shared']:>6} B shared"
                         f"{', ' + params if params else ''}")
    return lines


def runs_here(manifest) -> tuple[None, str]:
    """This check cannot tell: it would need the GPU's driver and arch."""
    return None, "needs an NVIDIA GPU of " + " or ".join(manifest["target"]["arches"])


def check_artifact(artifact) -> None:
    """The manifest's cuda entry for its types, and against what the plans and kernels were built
    for (targets/expects.py), before anything is uploaded or launched."""
    from llmc.artifact import ArtifactError
    from llmc.manifest import ManifestError, check_dict, check_int, check_list, check_str

    from ..expects import compare, require

    target = artifact.manifest["target"]
    try:
        check_dict(target, "target", ("arches", "act_dtype", "kv_dtype", "chunk", "max_tokens", "decode_batch",
                                      "arena_bytes", "weights", "weight_dtypes", "kernels", "decode_launches"))
        for key in ("arches", "weights", "weight_dtypes"):
            for i, value in enumerate(check_list(target[key], f"target.{key}")):
                check_str(value, f"target.{key}.{i}")
        for key in ("chunk", "max_tokens", "decode_batch", "arena_bytes"):
            check_int(target[key], f"target.{key}")
        for key in ("kernels", "decode_launches"):
            check_dict(target[key], f"target.{key}")
    except ManifestError as exc:
        raise ArtifactError(f"{artifact.path} has a manifest that is not valid: {exc}; rebuild the artifact") from None
    try:
        expects = json.loads(bytes(artifact.section("cuda_plan")).decode()).get("expects")
    except (AttributeError, ValueError, UnicodeDecodeError):
        expects = None
    require(expects, ("decode_batch", "act", "weight_dtypes"), artifact.path)
    compare(artifact.manifest, expects, target["weights"], artifact.path, [
        ("the most tokens a call takes (target.max_tokens)", target["max_tokens"], expects["max_tokens"]),
        ("the most tokens a call takes (target.chunk)", target["chunk"], expects["max_tokens"]),
        ("its largest decode batch", target["decode_batch"], expects["decode_batch"]),
        ("its activation dtype", [target["act_dtype"], target["kv_dtype"]], [expects["act"], expects["act"]]),
        ("its weights' storage dtypes", target["weight_dtypes"], expects["weight_dtypes"])])


def executor(artifact, threads: int | None = None):
    import os

    check_artifact(artifact)                 # before anything is uploaded or launched

    if os.environ.get("LLMC_CUDA_EMULATE") == "1":          # no GPU: Triton's interpreter, slowly
        from .emulate import EmulatedExecutor

        return EmulatedExecutor(artifact, threads)
    from .launch import CudaExecutor

    return CudaExecutor(artifact, threads)


def check_options(arches, act: str, chunk: int | None) -> None:
    """Refuse arches, an activation dtype or a chunk this target cannot build (KV_FORMATS says
    which KV formats it takes)."""
    parse_arches(arches)
    if act not in ACT_DTYPES:
        raise UsageError(f"unknown activation dtype {act!r} for target cuda; choose {' or '.join(ACT_DTYPES)}")
    check_chunk(chunk)


@dataclass
class CudaBuild:
    sections: dict[str, bytes]
    manifest: dict              # the artifact's "target" entry
    kernels: dict[str, int]     # kernel function -> launches in one decode step
    cached: int                 # kernel compilations the cache answered
    compiled: int


def compile_graphs(graphs: dict[str, Graph], *, arches=None, act: str = "f16", chunk: int = CHUNK,
                   progress=None) -> CudaBuild:
    """The plans (``lower.PLANS``) of the step graph ``graphs["step"]`` (``llmc.abi``), their
    kernels compiled for every arch in ``arches``."""
    from llmc.cache import active

    from ..expects import record
    from .build import compile_kernels
    from .lower import PLANS, KernelTable, WeightTable, lower_graph
    from .plan import SAMPLE_STEPS
    from .tuning import table

    check_options(arches, act, chunk)
    targets = parse_arches(arches)
    graph = graphs["step"]
    decode_batch = min(chunk, MAX_DECODE_BATCH)
    most = {"step": chunk, "decode": 1, "decode_batch": decode_batch}
    kernels, weights = KernelTable(), WeightTable()
    plans = {}
    cache = active()
    tuned = cache.entry("cuda", "tuning.json") if cache.reads else None
    names = [name for name in PLANS if name != "decode_batch" or decode_batch > 1]
    for arch in targets:
        tuning = table(arch, tuned)
        plans[f"sm_{arch}"] = {name: lower_graph(graph, kernels, weights, tuning, act, PLANS[name], most[name])
                               for name in names}
    sampling = {
        "argmax": kernels.add("kernels", "argmax", [["logits", "*fp32"], ["N", "i32"], ["token", "*i64"]],
                              {"BLOCK": 1024}, {"num_warps": 4, "num_stages": 1}),
        "sample": kernels.add("kernels", "sample", [["logits", "*fp32"], ["N", "i32"], ["params", "*fp32"],
                                                    ["seed", "i32"], ["token", "*i64"]],
                              {"BLOCK": 1024, "STEPS": SAMPLE_STEPS}, {"num_warps": 4, "num_stages": 1}),
    }
    # Each arch compiles only the kernels its own plans launch, and the sampling kernels.
    used = {name: {s["kernel"] for plan in arch_plans.values() for s in plan["steps"]} | set(sampling.values())
            for name, arch_plans in plans.items()}
    wanted = {arch: {k: kernels.entries[k] for k in sorted(used[f"sm_{arch}"])} for arch in targets}
    compiled, cached = compile_kernels(wanted, kernels.sources, progress)
    sections, table_of = {}, {}
    for arch, entries in compiled.items():
        blob, index = bytearray(), {}
        for key in sorted(entries):
            cubin, meta = entries[key]
            index[key] = dict(meta, offset=len(blob), size=len(cubin))
            blob += cubin
            blob += b"\0" * (-len(blob) % 256)
        sections[f"cubin_sm{arch}"] = bytes(blob)
        table_of[f"sm_{arch}"] = index
    # What the kernels and plans were built for, checked against the manifest before a load (check_artifact).
    expects = {**record(graph, weights.names), "max_tokens": chunk, "decode_batch": decode_batch, "act": act,
               "weight_dtypes": list(weights.dtypes)}
    plan = {"plans": plans, "sampling": sampling, "kernels": dict(sorted(kernels.entries.items())), "cubins": table_of,
            "expects": expects}
    sections["cuda_plan"] = json.dumps(plan, sort_keys=True).encode()
    sections["cuda_src"] = json.dumps(kernels.sources, sort_keys=True).encode()
    launches: dict[str, int] = {}
    for step in plans[f"sm_{targets[0]}"]["decode"]["steps"]:
        function = kernels.entries[step["kernel"]]["function"]
        function = "elementwise" if function.startswith("elementwise_") else function
        launches[function] = launches.get(function, 0) + 1
    manifest = {
        "name": "cuda", "executor": "Triton kernels as cubins through the CUDA driver API",
        "arches": [f"sm_{a}" for a in targets], "act_dtype": act, "kv_dtype": act, "chunk": chunk,
        "max_tokens": chunk, "decode_batch": decode_batch,
        "arena_bytes": max(p["arena_bytes"] for arch_plans in plans.values() for p in arch_plans.values()),
        "weights": weights.names, "weight_dtypes": weights.dtypes,
        "kernels": {f"sm_{a}": sorted(compiled[a]) for a in targets},
        "decode_launches": dict(sorted(launches.items())),
    }
    total = sum(len(v) for v in compiled.values())
    return CudaBuild(sections, manifest, dict(sorted(launches.items())), cached, total - cached)
