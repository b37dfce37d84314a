"""The runtime side of a cuda artifact's plans: read them, check them, and turn each step into a
launch (kernel, grid, argument values) for the sizes of one call. Used by the launcher and by the
emulator alike; imports neither torch nor Triton."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

from llmc import dims
from llmc.artifact import Artifact, ArtifactError

POINTER_BASES = ("arena", "out", "tokens", "meta", "params", "token")
SAMPLE_STEPS = 32          # bisection halvings of the top-k / top-p cut-offs


@dataclass
class Launch:
    kernel: str
    grid: tuple[int, int, int]
    args: list[tuple]            # ("p", base, byte offset) | ("i", int) | ("f", float)


class Plan:
    """One entry function's steps with their dims parsed once."""

    def __init__(self, plan: dict, kernels: dict, weights: int, caches: int):
        self.arena_bytes = int(plan["arena_bytes"])
        self.steps = []
        for step in plan["steps"]:
            if step["kernel"] not in kernels:
                raise ValueError(f"a step launches unknown kernel {step['kernel']}")
            grid = [(dims.evaluator(d), int(div)) for d, div in step["grid"]]
            args = []
            for arg in step["args"]:
                if arg[0] == "p":
                    base = arg[1]
                    if not (base in POINTER_BASES or (base[0] == "w" and int(base[1:]) < weights)
                            or (base[0] == "c" and int(base[1:]) < caches)):
                        raise ValueError(f"a step reads unknown buffer {base}")
                    args.append(("p", base, dims.evaluator(arg[2])))
                elif arg[0] == "i":
                    args.append(("i", dims.evaluator(arg[1])))
                elif arg[0] == "f":
                    args.append(("f", float(arg[1])))
                else:
                    raise ValueError(f"unknown argument kind {arg[0]!r}")
            self.steps.append((step["kernel"], grid, args))

    def launches(self, env: dict[str, int]) -> Iterator[Launch]:
        for kernel, grid, args in self.steps:
            sizes = tuple(max(-(-f(env) // div), 0) for f, div in grid)
            values = [(a[0], a[1], a[2](env)) if a[0] == "p" else (("i", a[1](env)) if a[0] == "i" else a)
                      for a in args]
            yield Launch(kernel, sizes, values)


@dataclass
class CudaProgram:
    """What a cuda artifact holds for one arch: its plans and kernel table."""
    arch: str
    plans: dict[str, Plan]
    kernels: dict[str, dict]          # key -> {module, function, arguments, constexprs, options}
    cubins: dict[str, dict]           # key -> launch metadata + offset/size in the cubin section
    weights: list[str]
    weight_dtypes: list[str]
    act: str
    chunk: int
    sampling: dict[str, str]          # "argmax" / "sample" -> kernel key


def read_program(artifact: Artifact, arch: str | None = None) -> CudaProgram:
    """The artifact's plans for ``arch`` (default: its first); ArtifactError if they are unusable."""
    target = artifact.manifest["target"]
    arches = target.get("arches") or []
    arch = arch or (arches[0] if arches else None)
    if arch not in arches:
        raise ArtifactError(f"{artifact.path} has cubins for {', '.join(arches) or 'no arch'}, not {arch}; "
                            f"rebuild it with --arch {arch}")
    try:
        data = json.loads(bytes(artifact.section("cuda_plan")).decode())
        kernels = data["kernels"]
        caches = len(artifact.manifest["kv_cache"]["inputs"])
        plans = {name: Plan(p, kernels, len(target["weights"]), caches) for name, p in data["plans"][arch].items()}
        return CudaProgram(arch, plans, kernels, data["cubins"][arch], list(target["weights"]),
                           list(target["weight_dtypes"]), target["act_dtype"], int(target["chunk"]),
                           dict(data["sampling"]))
    except (KeyError, ValueError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{artifact.path}: its cuda plan cannot be read ({exc}); rebuild the artifact") from None


def cache_shapes(kv_cache: dict, ctx: int) -> list[tuple[int, int, int, int]]:
    """The shape of each KV cache buffer on the device ([layers, kv_heads, ctx, head_dim]), from
    the manifest's "kv_cache" entry."""
    shape = (int(kv_cache["layers"]), int(kv_cache["kv_heads"]), ctx, int(kv_cache["head_dim"]))
    return [shape for _ in kv_cache["inputs"]]


def plan_for(graph: str, count: int) -> str:
    """The plan a call runs: one token through "graph" is the decode step."""
    return "decode" if graph == "graph" and count == 1 else graph


class PlanRunner:
    """How a cuda executor runs calls, whatever runs the kernels. A backend provides ``program``,
    ``vocab``, ``ctx`` and: ``_begin(ids, start_pos)`` (tokens and meta to the device),
    ``_execute(plan, env)``, ``_logits(rows)`` (the output to the host), ``_launch(launch)`` and
    ``_token()`` (the sampled id to the host)."""

    def run(self, graph: str, tokens, start_pos: int, caches=None):
        import numpy as np

        pieces = []
        for at, ids in self._chunks(tokens):
            self._call(graph, ids, start_pos + at)
            pieces.append(self._logits(len(ids) if graph == "graph_all" else 1))
        if graph == "graph_all":
            return np.concatenate(pieces)
        return pieces[-1]

    def step_token(self, tokens, start_pos: int, params, draw: int) -> int:
        """One prefill or decode step, then the next token chosen on the device (argmax, or a draw
        after temperature, top-k, top-p and min-p): only its id crosses to the host."""
        for at, ids in self._chunks(tokens):
            self._call("graph", ids, start_pos + at)
        if params.temperature == 0:
            args = [("p", "out", 0), ("i", self.vocab), ("p", "token", 0)]
            self._launch(Launch(self.sampling["argmax"], (1, 1, 1), args))
        else:
            import numpy as np

            self._set_params(np.array([params.temperature, params.top_k, params.top_p, params.min_p], np.float32))
            seed = ((params.seed or 0) * 1000003 + draw) & 0x7FFFFFFF
            args = [("p", "out", 0), ("i", self.vocab), ("p", "params", 0), ("i", seed), ("p", "token", 0)]
            self._launch(Launch(self.sampling["sample"], (1, 1, 1), args))
        return self._token()

    @property
    def sampling(self) -> dict[str, str]:
        return self.program.sampling

    def _chunks(self, tokens):
        import numpy as np

        for at in range(0, len(tokens), self.program.chunk):
            yield at, np.ascontiguousarray(tokens[at: at + self.program.chunk], dtype=np.int64)

    def _call(self, graph: str, ids, start_pos: int) -> None:
        self._begin(ids, start_pos)
        self._execute(plan_for(graph, len(ids)), {"seq": len(ids), "ctx": self.ctx})


def to_storage(array, dtype: str):
    """A weight as the device stores it (numpy): f16, f32, bf16 as its uint16 bit pattern (round to
    nearest even), integer codes unchanged."""
    import numpy as np

    if dtype == "bf16":
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        rounded = bits + (0x7FFF + ((bits >> 16) & 1))
        return (rounded >> 16).astype(np.uint16)
    if dtype in ("f16", "f32"):
        return np.ascontiguousarray(array, dtype=np.float16 if dtype == "f16" else np.float32)
    return np.ascontiguousarray(array)
