"""The cuda target's launcher: runs an artifact's plans on the GPU through the driver API (no torch,
no Triton).

At load: the cubins of the device's arch are loaded, the weights uploaded in their device dtypes,
and the activation arena, token and logits buffers allocated. ``allocate_caches`` (called by
``llmc.load`` with the chosen context length) puts the KV cache on the device and captures the
decode plan as a CUDA graph; each decode step then copies its token and position to the device,
replays the graph, and brings back the logits or only the sampled token id.
"""

from __future__ import annotations

import ctypes

import numpy as np

from llmc.artifact import Artifact, ArtifactError

from .driver import Driver
from .plan import Launch, PlanRunner, cache_shapes, read_program, to_storage


def pick_arch(arches: list[str], major: int, minor: int, path) -> str:
    """The artifact's arch for a GPU of compute capability major.minor: the same, or the newest
    of the same major below it (cubins run on later minors); sm_90 cubins only on sm_90."""
    usable = [a for a in arches if int(a[3:-1]) == major and int(a[-1]) <= minor and not (major == 9 and a != "sm_90")]
    if not usable:
        raise ArtifactError(f"{path} has cubins for {', '.join(arches)}, and this GPU is sm_{major}{minor}: rebuild "
                            f"it with --arch sm_{major}{minor} (or add it to the list)")
    return max(usable, key=lambda a: int(a[3:]))


class CudaExecutor(PlanRunner):
    """Target ``cuda``: the artifact's plans launched on the GPU."""

    def __init__(self, artifact: Artifact, threads: int | None = None):
        self.driver = driver = Driver()
        major, minor = driver.arch()
        self.program = read_program(artifact, pick_arch(artifact.manifest["target"]["arches"], major, minor,
                                                        artifact.path))
        section = artifact.section(f"cubin_sm{self.program.arch[3:]}")
        self.functions = {}
        for key, meta in self.program.cubins.items():
            arguments = self.program.kernels[key]["arguments"]
            if len(meta["params"]) != len(arguments) + 2:
                raise ArtifactError(f"{artifact.path}: kernel {key} does not take the arguments its plan passes; "
                                    "rebuild the artifact")
            cubin = bytes(section[meta["offset"]: meta["offset"] + meta["size"]])
            function = driver.load_function(cubin, meta["name"], meta["shared"])
            self.functions[key] = (function, 32 * meta["num_warps"], meta["shared"],
                                   max(meta["global_scratch"][0], meta["profile_scratch"][0]))
        arrays = artifact.weights()
        self.base: dict[str, int] = {}
        for index, (name, dtype) in enumerate(zip(self.program.weights, self.program.weight_dtypes)):
            data = to_storage(arrays[name], dtype)
            self.base[f"w{index}"] = driver.alloc(data.nbytes)
            driver.upload(self.base[f"w{index}"], data.ctypes.data, data.nbytes)
            driver.synchronize()
        self.vocab = int(artifact.manifest["vocab_size"])
        self.cache = artifact.manifest["kv_cache"]
        chunk = self.program.chunk
        sizes = {"arena": max(p.arena_bytes for p in self.program.plans.values()), "tokens": 8 * chunk, "meta": 16,
                 "out": 4 * chunk * self.vocab, "params": 16, "token": 8}
        for name, nbytes in sizes.items():
            self.base[name] = driver.alloc(nbytes)
        self.scratch, self.scratch_bytes = 0, 0
        self.ctx = 0
        self.decode_graph = None
        self._staged: list[np.ndarray] = []

    def allocate_caches(self, ctx: int) -> int:
        """The KV cache on the device (activation dtype) for ``ctx`` positions; then the decode
        step is captured as a CUDA graph over these buffers. Returns the cache's bytes."""
        shapes = cache_shapes(self.cache, ctx)
        nbytes = 2 * int(np.prod(shapes[0]))            # fp16 or bf16
        for index in range(len(shapes)):
            self.base[f"c{index}"] = self.driver.alloc(nbytes)
        self.ctx = ctx
        env = {"seq": 1, "ctx": ctx}
        launches = list(self.program.plans["decode"].launches(env))
        self._reserve_scratch(launches)
        self.decode_graph = self.driver.capture(lambda: [self._launch(launch) for launch in launches])
        return nbytes * len(shapes)

    # -- PlanRunner backend ------------------------------------------------------------------

    def _begin(self, ids: np.ndarray, start_pos: int) -> None:
        meta = np.array([start_pos, len(ids)], np.int64)
        self._staged = [ids, meta]                   # alive until the copies are done
        self.driver.upload(self.base["tokens"], ids.ctypes.data, ids.nbytes)
        self.driver.upload(self.base["meta"], meta.ctypes.data, meta.nbytes)

    def _execute(self, plan: str, env: dict) -> None:
        if plan == "decode" and self.decode_graph is not None:
            self.driver.replay(self.decode_graph)
            return
        launches = list(self.program.plans[plan].launches(env))
        self._reserve_scratch(launches)
        for launch in launches:
            self._launch(launch)

    def _launch(self, launch: Launch) -> None:
        function, threads, shared, _ = self.functions[launch.kernel]
        values = []
        for arg in launch.args:
            if arg[0] == "p":
                values.append(ctypes.c_uint64(self.base[arg[1]] + arg[2]))
            elif arg[0] == "i":
                values.append(ctypes.c_int32(arg[1]))
            else:
                values.append(ctypes.c_float(arg[1]))
        values += [ctypes.c_uint64(self.scratch), ctypes.c_uint64(self.scratch)]   # Triton's scratch pointers
        params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
        if all(launch.grid):
            self.driver.launch(function, launch.grid, threads, shared, params)

    def _reserve_scratch(self, launches: list[Launch]) -> None:
        """Triton's per-program global scratch, sized for the largest launch (0 for most kernels)."""
        need = max((self.functions[l.kernel][3] * l.grid[0] * l.grid[1] * l.grid[2] for l in launches), default=0)
        if need > self.scratch_bytes:        # the old block stays: a captured graph may point at it
            self.scratch, self.scratch_bytes = self.driver.alloc(need), need

    def _logits(self, rows: int) -> np.ndarray:
        out = np.empty((rows, self.vocab), np.float32)
        self.driver.download(out.ctypes.data, self.base["out"], out.nbytes)
        return out

    def _set_params(self, values: np.ndarray) -> None:
        self._staged.append(values)
        self.driver.upload(self.base["params"], values.ctypes.data, values.nbytes)

    def _token(self) -> int:
        token = np.zeros(1, np.int64)
        self.driver.download(token.ctypes.data, self.base["token"], 8)
        return int(token[0])
