"""The onnx target's runtime side: an ONNX Runtime InferenceSession over the artifact's model, its
initializers made from the artifact's tensors (weights.py), and a host KV pool the step reads as an
input; each step's new keys and values come back as outputs and are written into their slots here.
Imports numpy and onnxruntime only."""

from __future__ import annotations

import os

import numpy as np

from llmc.artifact import ArtifactError
from llmc.errors import LlmcError
from llmc.ops import kv_slots

from .. import pool_arrays
from . import PROVIDERS
from .weights import initializers


class OnnxExecutor:
    def __init__(self, artifact, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise LlmcError(f"{artifact.path} is an onnx build: running it needs onnxruntime "
                            "(pip install 'llmc-compiler[onnx]')") from None
        self.artifact = artifact
        target = artifact.manifest["target"]
        provider = PROVIDERS[target["provider"]]
        if provider not in ort.get_available_providers():
            raise LlmcError(f"{artifact.path} was built for ONNX Runtime's {provider}, which this onnxruntime lacks "
                            f"(it has {', '.join(ort.get_available_providers())}); rebuild with --provider cpu")
        self.threads = max(1, int(threads or len(os.sched_getaffinity(0))))
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        made = dict(initializers(artifact))
        self._initializers = list(made.values())        # the arrays ORT reads: kept alive with the session
        options.add_external_initializers(list(made), [ort.OrtValue.ortvalue_from_numpy(a) for a in made.values()])
        try:
            self.session = ort.InferenceSession(bytes(artifact.section("onnx")), options, providers=[provider])
        except Exception as exc:    # ORT raises its own types for a model it cannot run
            raise ArtifactError(f"{artifact.path}: ONNX Runtime cannot load its model ({str(exc)[:200]}); "
                                "rebuild the artifact") from None
        self.block_size = int(artifact.manifest["kv_pool"]["block_size"])
        self.pool: list[np.ndarray] = []

    def allocate_pool(self, blocks: int) -> int:
        self.pool = pool_arrays(self.artifact, blocks)
        return sum(a.nbytes for a in self.pool)

    def run(self, entry: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        k_cache, v_cache = self.pool
        feed = {name: np.ascontiguousarray(value, dtype=np.int64) for name, value in inputs.items()}
        logits, new_k, new_v = self.session.run(None, {**feed, "k_cache": k_cache, "v_cache": v_cache})
        blocks, offsets = kv_slots(feed["positions"], feed["seq_index"], feed["block_tables"], k_cache.shape[1],
                                   self.block_size)
        k_cache[:, blocks, :, offsets] = new_k          # [seq, layers, kv_heads, head_dim]
        v_cache[:, blocks, :, offsets] = new_v
        return logits
