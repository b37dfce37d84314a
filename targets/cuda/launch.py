"""The cuda target's launcher: runs an artifact's plans on the GPU through the driver API (no torch,
no Triton).

At load: the cubins of the device's arch are loaded, the weights uploaded in their device dtypes,
and the activation arena, batch and logits buffers allocated. ``allocate_pool`` (called by the
runtime with the number of KV blocks) puts the KV pool and the block-table buffer on the device.
A step uploads its staged batch (``plan.stage``) and runs its plan: a decode batch replays the
CUDA graph captured for its bucket the first time the bucket ran, any other batch launches the
step plan's kernels one by one; then the logits of the asked rows, or only a sampled token id,
come back.
"""

from __future__ import annotations

import ctypes
import statistics
import time

import numpy as np

from llmc.artifact import Artifact, ArtifactError

from .driver import Driver
from .plan import BATCH, Launch, PlanRunner, Staged, read_program, to_storage


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
        most = self.program.max_tokens
        sizes = {"arena": max(p.arena_bytes for p in self.program.plans.values()), "out": 4 * most * self.vocab,
                 "tiles": 8 * most, "params": 16, "token": 8, **{name: 8 * most for name in BATCH if name != "block_tables"}}
        for name, nbytes in sizes.items():
            self.base[name] = driver.alloc(nbytes)
        self.scratch, self.scratch_bytes = 0, 0
        self.graphs: dict[tuple, ctypes.c_void_p] = {}        # (plan, sizes) -> captured decode graph
        self._staged: list[np.ndarray] = []

    def _new_pool(self, blocks: int, width: int) -> int:
        """The KV pool tensors and a block-table buffer for a step's most sequences; graphs
        captured over the old ones are dropped."""
        self.driver.synchronize()                       # nothing queued may still use the old ones
        for graph in self.graphs.values():
            self.driver.destroy_graph(graph)
        self.graphs.clear()
        shapes = [shape for _, shape, _ in self.program.pool.shapes(blocks)]
        for name in ["block_tables"] + [f"c{index}" for index in range(len(shapes))]:
            if name in self.base:
                self.driver.free(self.base.pop(name))
        sizes = [2 * int(np.prod(shape)) for shape in shapes]          # fp16 or bf16
        for index, nbytes in enumerate(sizes):
            self.base[f"c{index}"] = self.driver.alloc(nbytes)
        self.base["block_tables"] = self.driver.alloc(8 * self.program.max_tokens * width)
        return sum(sizes)

    def stream_bandwidth(self, megabytes: int = 1024, runs: int = 5) -> float:
        """The GPU's memory bandwidth in GB/s, measured: a device-to-device copy (each byte read
        once and written once), median of ``runs``; what ``llmc bench`` puts decode against."""
        nbytes = megabytes << 20
        source, dest = self.driver.alloc(nbytes), self.driver.alloc(nbytes)
        rates = []
        for _ in range(runs + 1):                     # the first copy warms up
            self.driver.synchronize()
            start = time.perf_counter()
            self.driver.copy(dest, source, nbytes)
            self.driver.synchronize()
            rates.append(2 * nbytes / (time.perf_counter() - start) / 1e9)
        self.driver.free(source)
        self.driver.free(dest)
        return statistics.median(rates[1:])

    # -- PlanRunner backend ------------------------------------------------------------------

    def _upload(self, staged: Staged) -> None:
        self._staged = list(staged.arrays.values())          # alive until the copies are done
        for name, array in staged.arrays.items():
            if array.nbytes:
                self.driver.upload(self.base[name], array.ctypes.data, array.nbytes)

    def _execute(self, plan: str, env: dict) -> None:
        if plan == "step":
            for launch in self._launches(plan, env):
                self._launch(launch)
            return
        key = (plan, tuple(sorted(env.items())))              # one graph per decode bucket
        if key not in self.graphs:
            launches = self._launches(plan, env)
            self.graphs[key] = self.driver.capture(lambda: [self._launch(launch) for launch in launches])
        self.driver.replay(self.graphs[key])

    def _launches(self, plan: str, env: dict) -> list[Launch]:
        launches = list(self.program.plans[plan].launches(env))
        self._reserve_scratch(launches)
        return launches

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
