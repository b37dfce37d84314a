"""``llmc.load(path)`` and the Model users generate with. Imports numpy, tokenizers and jinja2 only.

The model owns the KV cache (its capacity, ``max_context``, is chosen here at load time) and runs
the artifact's entry points through the executor of the artifact's target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from llmc.artifact import Artifact, ArtifactError, read_artifact
from llmc.errors import LlmcError
from llmc.runtime.sampler import Sampler, SamplingParams
from llmc.runtime.tokenizer import Tokenizer

DEFAULT_MAX_CONTEXT = 4096


class ReferenceExecutor:
    """Target ``ref``: the artifact's IR run by the numpy reference interpreter."""

    def __init__(self, artifact: Artifact, threads: int | None = None):
        from llmc.ir import IRError, parse_graph, verify

        weights = artifact.weights()
        try:
            self.graphs = {name: parse_graph(bytes(artifact.section(name)).decode(), weights)
                           for name in ("graph", "graph_all")}
            for graph in self.graphs.values():
                verify(graph)
        except (IRError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{artifact.path}: its graph cannot be read ({exc}); rebuild the artifact") from None

    def run(self, graph: str, tokens: np.ndarray, start_pos: int, caches: list[np.ndarray]) -> np.ndarray:
        from llmc.interpret import run

        return run(self.graphs[graph], [tokens, np.array(start_pos, np.int64)] + caches)[0]


def _cpu_executor(artifact: Artifact, threads: int | None):
    from llmc.targets.cpu.launch import CpuExecutor

    return CpuExecutor(artifact, threads)


def _cuda_executor(artifact: Artifact, threads: int | None):
    import os

    if os.environ.get("LLMC_CUDA_EMULATE") == "1":          # no GPU: Triton's interpreter, slowly
        from llmc.targets.cuda.emulate import EmulatedExecutor

        return EmulatedExecutor(artifact, threads)
    from llmc.targets.cuda.launch import CudaExecutor

    return CudaExecutor(artifact, threads)


EXECUTORS = {"ref": ReferenceExecutor, "cpu": _cpu_executor, "cuda": _cuda_executor}


class Model:
    def __init__(self, artifact: Artifact, max_context: int | None, threads: int | None):
        manifest = artifact.manifest
        self.path = artifact.path
        self.manifest = manifest
        target = manifest["target"]["name"]
        if target not in EXECUTORS:
            raise ArtifactError(f"{artifact.path} was built for target {target!r}; this llmc runs "
                                f"{', '.join(EXECUTORS)} artifacts")
        self.executor = EXECUTORS[target](artifact, threads)
        self.threads = threads
        limit = int(manifest["model"]["max_seq"])
        self.max_context = min(limit, DEFAULT_MAX_CONTEXT) if max_context is None else int(max_context)
        if not 1 <= self.max_context <= limit:
            raise LlmcError(f"max_context must be between 1 and the model's {limit} positions, not {max_context}")
        # A device target keeps the KV cache in its own memory; the others get numpy arrays.
        on_device = getattr(self.executor, "allocate_caches", None)
        self._caches = [] if on_device else self._allocate_caches(manifest["kv_cache"])
        self._cache_bytes = on_device(self.max_context) if on_device else sum(a.nbytes for a in self._caches)
        tok = manifest.get("tokenizer")
        self.tokenizer = Tokenizer(bytes(artifact.section("tokenizer")).decode(), tok) if tok else None
        self.vocab_size = int(manifest["vocab_size"])

    def _allocate_caches(self, cache: dict) -> list[np.ndarray]:
        """The cache arrays the graph takes after tokens and start_pos, with ctx = max_context."""
        from llmc import dims
        from llmc.ir import numpy_dtype, parse_type

        arrays = []
        for _, text in cache["inputs"]:
            t = parse_type(text)
            shape = tuple(dims.evaluate(d, {"ctx": self.max_context}) for d in t.shape)
            arrays.append(np.zeros(shape, numpy_dtype(t.dtype)))
        return arrays

    @property
    def cache_bytes(self) -> int:
        return self._cache_bytes

    # -- entry points ------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        array = np.asarray(list(ids), dtype=np.int64)
        if array.ndim != 1 or array.size == 0:
            raise LlmcError("token ids must be a non-empty list of ints")
        if array.min() < 0 or array.max() >= self.vocab_size:
            raise LlmcError(f"token ids must be in [0, {self.vocab_size})")
        return array

    def _fits(self, needed: int) -> None:
        if needed > self.max_context:
            raise LlmcError(f"{needed} positions do not fit the KV cache of {self.max_context}: shorten the prompt "
                            f"or max_new_tokens, or load with a larger max_context (the model allows "
                            f"{self.manifest['model']['max_seq']})")

    def step(self, token_ids: Sequence[int] | np.ndarray, start_pos: int) -> np.ndarray:
        """One prefill or decode step over the KV cache: the logits of the last token, [vocab]."""
        ids = self._check_ids(token_ids)
        self._fits(start_pos + len(ids))
        return self.executor.run("graph", ids, start_pos, self._caches)[-1]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits for every position, [len(token_ids), vocab] float32."""
        ids = self._check_ids(token_ids)
        self._fits(len(ids))
        return self.executor.run("graph_all", ids, 0, self._caches).astype(np.float32)

    # -- generation --------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] | str | None = None, stream: bool = False):
        """New text for a str prompt, new token ids for a list of ids; ``stream=True`` yields the pieces."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        as_text = isinstance(prompt, str)
        if as_text and self.tokenizer is None:
            raise LlmcError("this artifact has no tokenizer (it was built without one): pass token ids")
        ids = self._check_ids(self.tokenizer.encode(prompt) if as_text else prompt)
        if max_new_tokens < 1:
            raise LlmcError("max_new_tokens must be >= 1")
        self._fits(len(ids) + max_new_tokens)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        pieces = self._pieces(ids, max_new_tokens, Sampler(params), as_text, stops)
        if stream:
            return pieces
        collected = list(pieces)
        return "".join(collected) if as_text else [t for piece in collected for t in piece]

    def _tokens(self, ids: np.ndarray, max_new_tokens: int, sampler: Sampler) -> Iterator[int]:
        eos = set(self.manifest.get("eos_token_ids") or [])
        history = list(ids)
        on_device = getattr(self.executor, "step_token", None)
        if on_device and sampler.params.repetition_penalty == 1.0:
            # The device samples: only token ids cross to the host (the penalty needs the history).
            def next_token(tokens, pos: int, step: int) -> int:
                return on_device(np.asarray(tokens, np.int64), pos, sampler.params, step)
        else:
            def next_token(tokens, pos: int, step: int) -> int:
                return sampler(self.step(tokens, pos), history)
        token = next_token(ids, 0, 0)
        for step in range(max_new_tokens):
            if token in eos:
                return
            yield token
            history.append(token)
            if step + 1 < max_new_tokens:
                token = next_token([token], len(history) - 1, step + 1)

    def _pieces(self, ids, max_new_tokens, sampler, as_text, stops) -> Iterator[Any]:
        if not as_text:
            for token in self._tokens(ids, max_new_tokens, sampler):
                yield [token]
            return
        new: list[int] = []
        emitted = ""
        for token in self._tokens(ids, max_new_tokens, sampler):
            new.append(token)
            text = self.tokenizer.decode(new)
            if text.endswith("\ufffd"):          # an incomplete UTF-8 sequence: wait for the rest
                continue
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if cut > len(emitted):
                    yield text[len(emitted):cut]
                return
            # Hold back a tail that could still grow into a stop string.
            hold = max((len(s) - 1 for s in stops), default=0)
            ready = len(text) - hold if hold else len(text)
            if ready > len(emitted):
                yield text[len(emitted):ready]
                emitted = text[:ready]
        text = self.tokenizer.decode(new)
        if len(text) > len(emitted):
            yield text[len(emitted):]

    def chat(self, messages: list[dict[str, Any]], **options):
        """Generate the assistant's reply with the checkpoint's own chat template."""
        if self.tokenizer is None:
            raise LlmcError("this artifact has no tokenizer, so it cannot chat")
        return self.generate(self.tokenizer.render_chat(messages), **options)


def load(path: str | Path, max_context: int | None = None, threads: int | None = None) -> Model:
    """Open a .llmc artifact (checked: format, checksums, CPU features) and return a Model."""
    return Model(read_artifact(path), max_context, threads)
