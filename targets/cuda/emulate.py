"""Run a cuda artifact without a GPU: its plans, launch by launch, through Triton's interpreter on
CPU tensors (``TRITON_INTERPRET=1``). Slow, and exact about what the kernels compute: the tests use
it to check the kernels and plans against the CPU target, and ``LLMC_CUDA_EMULATE=1`` makes
``llmc.load`` use it to try a cuda artifact on a machine without one. Needs torch and Triton.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys

import numpy as np

from llmc.artifact import Artifact
from llmc.errors import LlmcError

from .plan import Launch, PlanRunner, Staged, read_program, to_storage

TORCH_DTYPES = {"*fp32": "float32", "*fp16": "float16", "*bf16": "bfloat16", "*i64": "int64", "*i32": "int32",
                "*i8": "int8", "*u8": "uint8"}


def interpreter():
    """Triton, in interpreter mode (switched on here when Triton is not imported yet)."""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton
    except ImportError:
        raise LlmcError("emulating a cuda artifact needs Triton and torch: pip install 'llmc-compiler[cuda]'") from None
    if not triton.knobs.runtime.interpret:
        raise LlmcError("Triton was imported before TRITON_INTERPRET=1 was set; set it before starting Python")
    return triton


def load_module(source: str, folder):
    """Import a kernel module's source (Triton reads kernels' source from their file)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    name = f"llmc_cuda_emulated_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    path = folder / f"{name}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != source:
        path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class EmulatedExecutor(PlanRunner):
    """Target ``cuda`` on the CPU: the same plans and kernels, run by Triton's interpreter."""

    def __init__(self, artifact: Artifact, threads: int | None = None, arch: str | None = None):
        interpreter()
        import torch

        from .build import cache_dir

        self.torch = torch
        self.program = read_program(artifact, arch)
        sources = json.loads(bytes(artifact.section("cuda_src")).decode())
        folder = cache_dir() / "emulate"
        self.functions = {}
        for key, entry in self.program.kernels.items():
            module = load_module(sources[entry["module"]], folder)
            self.functions[key] = getattr(module, entry["function"])
        arrays = artifact.weights()
        self.weights = [self._tensor(to_storage(arrays[name], dtype), dtype)
                        for name, dtype in zip(self.program.weights, self.program.weight_dtypes)]
        self.vocab = int(artifact.manifest["vocab_size"])
        self.arena = torch.zeros(max(p.arena_bytes for p in self.program.plans.values()) + 256, dtype=torch.uint8)
        self.pool: list = []
        self.buffers: dict = {}

    def _tensor(self, array: np.ndarray, dtype: str):
        torch = self.torch
        if dtype == "bf16":
            return torch.from_numpy(array.copy()).view(torch.bfloat16)
        return torch.from_numpy(np.array(array))

    def _new_pool(self, blocks: int, width: int) -> int:
        """The KV pool on the (emulated) device, in the activation dtype; returns its bytes."""
        dtype = getattr(self.torch, {"f16": "float16", "bf16": "bfloat16"}[self.program.act])
        self.pool = [self.torch.zeros(shape, dtype=dtype) for _, shape, _ in self.program.pool.shapes(blocks)]
        return sum(c.numel() * c.element_size() for c in self.pool)

    def _pointer(self, base: str, offset: int, kind: str):
        torch = self.torch
        dtype = getattr(torch, TORCH_DTYPES[kind])
        if base[0] == "w" and base[1:].isdigit():
            tensor = self.weights[int(base[1:])]
        elif base[0] == "c" and base[1:].isdigit():
            tensor = self.pool[int(base[1:])]
        else:
            tensor = self.buffers[base]
        raw = tensor.reshape(-1).view(torch.uint8)
        usable = (raw.numel() - offset) // dtype.itemsize * dtype.itemsize
        return raw[offset: offset + usable].view(dtype)

    def _upload(self, staged: Staged) -> None:
        torch = self.torch
        self.buffers = {name: torch.from_numpy(array.copy()) for name, array in staged.arrays.items()}
        self.buffers.update(arena=self.arena, out=torch.zeros((staged.env["rows"], self.vocab), dtype=torch.float32),
                            params=torch.zeros(4, dtype=torch.float32), token=torch.zeros(1, dtype=torch.int64))

    def _execute(self, plan: str, env: dict) -> None:
        for launch in self.program.plans[plan].launches(env):
            self._launch(launch)

    def _launch(self, launch: Launch) -> None:
        entry = self.program.kernels[launch.kernel]
        args = [self._pointer(a[1], a[2], kind) if a[0] == "p" else a[1]
                for a, (_, kind) in zip(launch.args, entry["arguments"])]
        if all(launch.grid):
            self.functions[launch.kernel][launch.grid](*args, **entry["constexprs"])

    def _logits(self, rows: int) -> np.ndarray:
        return self.buffers["out"][:rows].numpy().copy()

    def _set_params(self, values: np.ndarray) -> None:
        self.buffers["params"].copy_(self.torch.from_numpy(values))

    def _token(self) -> int:
        return int(self.buffers["token"][0])
