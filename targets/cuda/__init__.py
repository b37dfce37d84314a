"""Target ``cuda``: the optimised graph as launch plans over Triton kernels, cross-compiled to cubins
for each requested GPU architecture on any machine (no GPU, no driver).

- kernels.py      hand-written Triton kernels: GEMV/GEMM (float, q8, q4), norms, RoPE, attention,
                  sampling
- elementwise.py  generated Triton kernels for elementwise ops and fused chains
- lower.py        graph -> launch plan (kernel, grid rule, arguments), arena planned by liveness
- tuning.py       block sizes, warps and stages per arch
- build.py        Triton cross-compilation to cubins, cached by content
- plan.py         the runtime side of a plan: arguments and grids evaluated per call
- driver.py       the CUDA driver API through ctypes
- launch.py       the executor: cubins loaded, weights and KV cache on the device, decode as a
                  captured CUDA graph (no torch, no Triton)
- emulate.py      the same plans run kernel by kernel by Triton's interpreter on CPU (tests)

An artifact holds, per arch, every kernel's cubin and launch metadata (section ``cubin_sm<NN>``
and the plan section), and the kernels' Triton source (section ``cuda_src``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llmc.errors import UsageError
from llmc.ir import Graph

from .. import check_chunk

CHUNK = 512                 # the most tokens one prefill call takes; the runtime splits longer prompts
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


def check_options(arches, act: str, chunk: int | None, kv: str = "f32") -> None:
    """Refuse arches, an activation dtype, a chunk or a KV cache format this target cannot build."""
    parse_arches(arches)
    if act not in ACT_DTYPES:
        raise UsageError(f"unknown activation dtype {act!r} for target cuda; choose {' or '.join(ACT_DTYPES)}")
    check_chunk(chunk)
    if kv != "f32":
        raise UsageError("the cuda target has no int8 KV cache yet; build with --kv f32 (the cache is then "
                         "stored in the activation dtype on the GPU)")


@dataclass
class CudaBuild:
    sections: dict[str, bytes]
    manifest: dict              # the artifact's "target" entry
    kernels: dict[str, int]     # kernel function -> launches in one decode step
    cached: int                 # kernel compilations the cache answered
    compiled: int


def compile_graphs(graphs: dict[str, Graph], *, arches=None, act: str = "f16", chunk: int = CHUNK,
                   progress=None) -> CudaBuild:
    """Plans for the entry graphs ("graph", "graph_all") plus a decode plan, their kernels compiled
    for every arch in ``arches``."""
    from llmc.cache import active

    from .build import compile_kernels
    from .lower import KernelTable, WeightTable, lower_graph
    from .plan import SAMPLE_STEPS
    from .tuning import table

    check_options(arches, act, chunk)
    targets = parse_arches(arches)
    kernels, weights = KernelTable(), WeightTable()
    plans = {}
    cache = active()
    tuned = cache.entry("cuda", "tuning.json") if cache.reads else None
    for arch in targets:
        tuning = table(arch, tuned)
        plans[f"sm_{arch}"] = {
            "decode": lower_graph(graphs["graph"], kernels, weights, tuning, act, True, chunk),
            "graph": lower_graph(graphs["graph"], kernels, weights, tuning, act, False, chunk),
            "graph_all": lower_graph(graphs["graph_all"], kernels, weights, tuning, act, False, chunk),
        }
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
    plan = {"plans": plans, "sampling": sampling, "kernels": dict(sorted(kernels.entries.items())), "cubins": table_of}
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
        "arena_bytes": max(p["arena_bytes"] for arch_plans in plans.values() for p in arch_plans.values()),
        "weights": weights.names, "weight_dtypes": weights.dtypes,
        "kernels": {f"sm_{a}": sorted(compiled[a]) for a in targets},
        "decode_launches": dict(sorted(launches.items())),
    }
    total = sum(len(v) for v in compiled.values())
    return CudaBuild(sections, manifest, dict(sorted(launches.items())), cached, total - cached)
