"""``llmc.load(path)`` and the Model users generate with. Imports numpy, tokenizers and jinja2 only.

A Model runs one artifact: the executor of its target (``llmc.targets``) calls the artifact's
``step`` entry point (``llmc.abi``), a batched, paged forward step over a KV pool the executor
owns. The pool's size is chosen here at load time: enough blocks for one sequence of
``max_context`` positions, which ``generate``, ``logits`` and ``step`` run as a batch of one, or
``kv_blocks`` blocks for callers that run batches of many sequences (``run_batch``).

One Model may be shared by threads, and its streams interleaved in any order: a lock serialises
the calls of the executor, a ``generate`` without ``stream`` holds it to the end (other threads
wait for the handle), and the one sequence's blocks remember whose tokens they hold. A stream
that finds another generation's tokens there writes its own again (prompt and tokens so far, in
steps) before its next token: interleaving costs time, never correctness. Many requests at once
are the engine's work (``llmc.Engine``), which gives each its own sequence.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from llmc import abi
from llmc.artifact import Artifact, read_artifact
from llmc.errors import LlmcError, UsageError, is_int
from llmc.runtime.sampler import Sampler, SamplingParams
from llmc.runtime.text import TextStream, check_stops
from llmc.runtime.tokenizer import Tokenizer

DEFAULT_MAX_CONTEXT = 4096


def check_threads(threads) -> None:
    """None (the target's default) or an int from 1 to the CPUs this process may run on: more
    threads than CPUs only take turns (1000 made 16 tokens take 37 s instead of 0.07 s)."""
    if threads is None:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not is_int(threads) or not 1 <= threads <= cpus:
        raise UsageError(f"threads must be an int from 1 to {cpus} (the CPUs this process may run on), "
                        f"not {threads!r}")


def check_token_ids(ids, vocab: int, what: str = "token ids") -> np.ndarray:
    """Token ids a user gave (a list or tuple of ints or numpy integers, or a 1-D integer array),
    each in [0, vocab), as int64; an LlmcError for anything else: floats are not truncated, and
    str or bytes are not read as sequences of ids."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise UsageError(f"{what} must be a 1-D array of ints, not {ids.dtype} of shape {ids.shape}")
        if ids.size == 1 and 0 <= ids[0] < vocab:       # a decode step's one token
            return ids.astype(np.int64)
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise UsageError(f"{what} must be a list of ints, not {type(ids).__name__}")
    bad = next((t for t in ids if not is_int(t)), None)
    if bad is not None:
        raise UsageError(f"{what} must be a list of ints: {bad!r} is a {type(bad).__name__}")
    outside = next((t for t in ids if not 0 <= t < vocab), None)
    if outside is not None:
        raise UsageError(f"{what} must be in [0, {vocab}), not {outside}")
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class Model:
    def __init__(self, artifact: Artifact, max_context: int | None, threads: int | None,
                 kv_blocks: int | None = None):
        from llmc.targets import target_of

        manifest = artifact.manifest
        self.path = artifact.path
        self.manifest = manifest
        self.entry = abi.check_manifest(manifest, artifact.path)
        self.layout = abi.PoolLayout.from_manifest(manifest)
        self.max_tokens = int(self.entry["max_tokens"])
        self.vocab_size = int(manifest["vocab_size"])
        check_threads(threads)
        self.executor = target_of(manifest, artifact.path).executor(artifact, threads)
        self.threads = threads
        limit = int(manifest["model"]["max_seq"])
        self.max_context = min(limit, DEFAULT_MAX_CONTEXT) if max_context is None else int(max_context)
        if not 1 <= self.max_context <= limit:
            raise LlmcError(f"max_context must be between 1 and the model's {limit} positions, not {max_context}")
        least = self.layout.blocks_for(self.max_context)
        self._engine = None
        self._lock = threading.RLock()
        # The generation whose tokens fill the one sequence's blocks (None: nobody's, or unknown).
        self._holder: object | None = None
        self._allocate(kv_blocks or least)
        # The one sequence generate/logits/step run: the pool's first blocks, in order.
        self._table = np.arange(least, dtype=np.int64)
        # A decode step's batch, kept: its token and position are rewritten each step (every
        # executor reads a batch's arrays only while it runs).
        self._lone = abi.Batch.single(np.zeros(1, np.int64), 0, self._table, "last")
        tok = manifest.get("tokenizer")
        self.tokenizer = Tokenizer(bytes(artifact.section("tokenizer")).decode(), tok) if tok else None

    def _allocate(self, kv_blocks) -> None:
        least = self.layout.blocks_for(self.max_context)
        if not is_int(kv_blocks) or kv_blocks < least:
            raise LlmcError(f"kv_blocks must be a whole number of at least {least} (one sequence of max_context "
                            f"{self.max_context} in blocks of {self.layout.block_size}), not {kv_blocks!r}")
        self.kv_blocks = int(kv_blocks)
        self._cache_bytes = self.executor.allocate_pool(kv_blocks)

    def take_over(self, engine, kv_blocks: int | None = None) -> None:
        """Hand the KV pool to an engine (resized to ``kv_blocks``), or back (``engine=None``).
        While an engine drives the model, the single-sequence calls refuse: they would write the
        blocks the engine's sequences hold."""
        if engine is not None and self._engine is not None and self._engine is not engine:
            raise LlmcError("this Model is already driven by another Engine: load the artifact again for a second one")
        with self._lock:
            if kv_blocks is not None and kv_blocks != self.kv_blocks:
                self._allocate(kv_blocks)
            self._engine = engine
            self._holder = None

    def _single(self) -> None:
        if self._engine is not None:
            raise LlmcError("this Model is driven by an Engine: submit requests to the engine "
                            "(engine.generate, engine.submit), or close it first")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The tokens that end a sequence (generation stops at them)."""
        return frozenset(self.manifest.get("eos_token_ids") or [])

    @property
    def cache_bytes(self) -> int:
        """Bytes of the KV pool (all of its blocks)."""
        return self._cache_bytes

    @property
    def bytes_per_position(self) -> int:
        """KV pool bytes one position of one sequence takes (all layers, keys and values)."""
        return int(self.manifest["kv_pool"]["bytes_per_block"]) // self.layout.block_size

    # -- entry points ------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        array = check_token_ids(ids, self.vocab_size)
        if array.size == 0:
            raise UsageError("token ids must be a non-empty list of ints")
        return array

    def _fits(self, needed: int) -> None:
        if needed > self.max_context:
            raise LlmcError(f"{needed} positions do not fit the KV cache of {self.max_context}: shorten the prompt "
                            f"or max_new_tokens, or load with a larger max_context (the model allows "
                            f"{self.manifest['model']['max_seq']})")

    def run_batch(self, batch: abi.Batch) -> np.ndarray:
        """One call of the step entry point on a batch of any sequences in the pool: the logits of
        ``batch.logit_rows``, [rows, vocab] float32. The batch is checked first."""
        self._check(batch)
        with self._lock:
            self._holder = None
            return self.executor.run(abi.STEP, batch.inputs())

    def _check(self, batch: abi.Batch) -> None:
        abi.check_batch(batch, self.layout, self.kv_blocks, self.max_tokens, self.vocab_size,
                        int(self.manifest["model"]["max_seq"]))

    def _chunks(self, ids: np.ndarray, start_pos: int, rows: str) -> Iterator[abi.Batch]:
        """The one sequence's tokens at ``start_pos..`` as steps of at most ``max_tokens``."""
        for at in range(0, len(ids), self.max_tokens):
            yield abi.Batch.single(ids[at: at + self.max_tokens], start_pos + at, self._table, rows)

    def _all_but_last(self, ids: np.ndarray, start_pos: int) -> abi.Batch:
        """Run the one sequence's chunks but the last; return that one, checked, for the caller to
        run (for logits, or sampled on the device)."""
        if len(ids) == 1:
            last = self._lone
            last.tokens[0], last.positions[0] = ids[0], start_pos
        else:
            *earlier, last = self._chunks(ids, start_pos, "last")
            for batch in earlier:
                self._check(batch)
                self.executor.run(abi.STEP, batch.inputs())
        self._check(last)
        return last

    def step(self, token_ids: Sequence[int] | np.ndarray, start_pos: int) -> np.ndarray:
        """One prefill or decode step of the model's one sequence: the logits of the last token, [vocab]."""
        ids = self._check_ids(token_ids)
        self._fits(start_pos + len(ids))
        with self._lock:
            self._single()
            self._holder = None
            return self._step(ids, start_pos)

    def _step(self, ids: np.ndarray, start_pos: int) -> np.ndarray:
        return self.executor.run(abi.STEP, self._all_but_last(ids, start_pos).inputs())[-1]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits for every position, [len(token_ids), vocab] float32."""
        ids = self._check_ids(token_ids)
        self._fits(len(ids))
        with self._lock:
            self._single()
            return np.concatenate([self.run_batch(b) for b in self._chunks(ids, 0, "all")]).astype(np.float32)

    # -- generation --------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] | str | None = None, stream: bool = False,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0):
        """New text for a str prompt, new token ids for a list of ids; ``stream=True`` yields the pieces."""
        self._single()
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed, presence_penalty,
                                frequency_penalty)
        as_text = isinstance(prompt, str)
        if as_text and self.tokenizer is None:
            raise LlmcError("this artifact has no tokenizer (it was built without one): pass token ids")
        if not is_int(max_new_tokens) or max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be an int >= 1, not {max_new_tokens!r}")
        if stop is not None and not as_text:
            raise UsageError("stop strings end text: give the prompt as text, or stop on token ids yourself "
                            "(stream=True yields each token)")
        ids = self.tokenizer.encode(prompt) if as_text else check_token_ids(prompt, self.vocab_size)
        if len(ids) == 0:
            raise UsageError("the prompt is empty: give at least one token of text" if as_text else
                            "the prompt is empty: give at least one token id")
        ids = np.asarray(ids, np.int64)
        self._fits(len(ids) + max_new_tokens)
        stops = check_stops(stop)
        pieces = self._pieces(ids, max_new_tokens, Sampler(params), as_text, stops)
        if stream:
            return pieces
        with self._lock:                    # the whole generation: other threads wait, none re-prefills
            collected = list(pieces)
        return "".join(collected) if as_text else [t for piece in collected for t in piece]

    def _tokens(self, ids: np.ndarray, max_new_tokens: int, sampler: Sampler) -> Iterator[int]:
        eos = self.eos_token_ids
        history = list(ids)
        on_device = getattr(self.executor, "sample", None)
        me = object()

        def next_token(tokens, pos: int, step: int) -> int:
            with self._lock:
                self._single()
                if self._holder is not me:      # another generation wrote the blocks: ours again
                    tokens, pos = history, 0
                self._holder = None             # until this step has written them
                tokens = np.asarray(tokens, np.int64)
                if on_device and not sampler.params.reads_history:
                    # The device samples: only token ids cross to the host (the penalties need the history).
                    last = self._all_but_last(tokens, pos)
                    token = on_device(abi.STEP, last.inputs(), sampler.params, step)
                else:
                    token = sampler(self._step(tokens, pos), history, generated=len(history) - len(ids))
                self._holder = me
                return token

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
        text = TextStream(self.tokenizer, stops)
        for token in self._tokens(ids, max_new_tokens, sampler):
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                return
        rest = text.finish()
        if rest:
            yield rest

    def chat(self, messages: list[dict[str, Any]], **options):
        """Generate the assistant's reply with the checkpoint's own chat template."""
        if self.tokenizer is None:
            raise LlmcError("this artifact has no tokenizer, so it cannot chat")
        return self.generate(self.tokenizer.render_chat(messages), **options)


def load(path: str | Path, max_context: int | None = None, threads: int | None = None,
         kv_blocks: int | None = None) -> Model:
    """Open a .llmc artifact (checked: format, checksums, entry points, CPU features) and return a
    Model whose KV pool holds ``kv_blocks`` blocks (default: one sequence of ``max_context``)."""
    return Model(read_artifact(path), max_context, threads, kv_blocks)
