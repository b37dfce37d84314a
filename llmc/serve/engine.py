"""``llmc.Engine``: many requests on one artifact — continuous batching, chunked prefill, prefix
caching, preemption — driven by one background thread.

Callers submit from any thread (``submit`` checks the request whole and queues it); the loop
takes what arrived, asks the scheduler (``llmc.serve.scheduler``) for the next step, runs it
on the model's batched, paged step, samples every sequence that reached its end in one pass
(``sample_rows``), and hands each request its deltas. A request joins at the next step and
leaves the moment it ends. The step runs without holding the engine's lock (the cpu executor
releases the GIL), so submissions and reads go on while it computes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llmc.errors import LlmcError, is_int
from llmc.serve.blocks import BlockPool
from llmc.serve.metrics import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, Histogram
from llmc.serve.requests import Delta, Request, RequestHandle, RequestOutput, TokenLogprob, make_request
from llmc.runtime.sampler import SamplingParams, sample_rows, top_logprobs
from llmc.serve.scheduler import Plan, Scheduler, Sequence
from llmc.runtime.text import TextStream

DEFAULT_KV_BYTES = 1 << 30
DEFAULT_STEP_TOKENS = 256
DEFAULT_RUNNING = 32


class QueueFullError(LlmcError):
    """The engine's queue of waiting requests is full: try again later (a server answers 429)."""


class EngineClosedError(LlmcError):
    """The engine has been closed: it takes no more requests (a server answers 503)."""


@dataclass(eq=False)
class _Completion:
    """What the engine keeps for one sequence besides its tokens."""

    handle: RequestHandle
    index: int
    params: SamplingParams
    rng: np.random.Generator
    text: Optional[TextStream]
    generated: int = 0
    last_token_at: float = 0.0


class Engine:
    """Serve many requests on one artifact. ``model``: a loaded ``Model`` (the engine takes its
    KV pool over and resizes it) or an artifact's path. Limits: the pool (``kv_blocks``, or
    ``kv_bytes``; default 1 GiB, at least one sequence of ``max_context``), ``max_running``
    sequences in a step, ``max_step_tokens`` tokens in a step (the prefill chunk), and
    ``max_queued`` requests waiting (past it ``submit`` raises QueueFullError)."""

    def __init__(self, model: Any, *, kv_blocks: int | None = None, kv_bytes: int | None = None,
                 max_running: int | None = None, max_step_tokens: int | None = None, max_queued: int = 256,
                 max_context: int | None = None, threads: int | None = None):
        from llmc.runtime.model import Model, load

        if isinstance(model, (str, Path)):
            model = load(model, max_context=max_context, threads=threads)
        elif not isinstance(model, Model):
            raise LlmcError(f"an Engine runs a Model or an artifact's path, not {type(model).__name__}")
        elif max_context is not None or threads is not None:
            raise LlmcError("max_context and threads are set when the model is loaded: llmc.load(path, ...)")
        step = min(DEFAULT_STEP_TOKENS, model.max_tokens) if max_step_tokens is None else max_step_tokens
        if not is_int(step) or not 1 <= step <= model.max_tokens:
            raise LlmcError(f"max_step_tokens must be an int from 1 to the artifact's {model.max_tokens} tokens a "
                            f"step, not {step!r}")
        if max_running is None:
            max_running = min(DEFAULT_RUNNING, step)
        # Every running sequence decodes in every step: more of them than the step's tokens would
        # leave the last ones waiting behind the first (vLLM asks the same of its limits).
        if not is_int(max_running) or not 1 <= max_running <= step:
            raise LlmcError(f"max_running must be an int from 1 to max_step_tokens ({step}), not {max_running!r}")
        if not is_int(max_queued) or max_queued < 0:
            raise LlmcError(f"max_queued must be an int >= 0, not {max_queued!r}")
        least = model.layout.blocks_for(model.max_context)
        if kv_blocks is None:
            if kv_bytes is not None and (not is_int(kv_bytes) or kv_bytes < 1):
                raise LlmcError(f"kv_bytes must be a positive int, not {kv_bytes!r}")
            per_block = model.bytes_per_position * model.layout.block_size
            kv_blocks = max(least, (kv_bytes or DEFAULT_KV_BYTES) // per_block)
        elif kv_bytes is not None:
            raise LlmcError("give the KV pool's size as kv_blocks or as kv_bytes, not both")
        model.take_over(self, kv_blocks)
        self.model = model
        self.max_queued = max_queued
        self.pool = BlockPool(model.kv_blocks, model.layout.block_size)
        self.scheduler = Scheduler(self.pool, max_running, step, least)
        self._lock = threading.Condition()
        self._inbox: list[Request] = []
        self._handles: dict[str, RequestHandle] = {}
        self._aborts: list[RequestHandle] = []
        self._unstarted: set[str] = set()          # requests none of whose sequences ran yet
        self._closing = False
        self._stats = Counter()
        self._finished = Counter()
        self._ttft, self._itl, self._e2e = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS), Histogram(E2E_BUCKETS)
        self._publish()
        self._thread = threading.Thread(target=self._loop, name="llmc-engine", daemon=True)
        self._thread.start()

    # -- the callers' side -----------------------------------------------------------------------

    def submit(self, prompt=None, **options) -> RequestHandle:
        """Queue a request (``prompt``: text or token ids, or ``messages=[...]`` and optionally
        ``tools=[...]`` for the chat template; the options are
        ``generate``'s plus ``max_tokens``, ``stop_token_ids``, ``n``, ``logprobs``,
        ``top_logprobs``, ``ignore_eos``) and return its handle. Thread-safe."""
        request = make_request(self.model, prompt, **options)
        handle = RequestHandle(self, request)
        with self._lock:
            if self._closing:
                raise EngineClosedError("the engine is closed: it takes no more requests")
            if len(self._unstarted) >= self.max_queued:
                raise QueueFullError(f"the engine's queue is full ({self.max_queued} requests wait): retry later")
            self._inbox.append(request)
            self._unstarted.add(request.id)
            self._handles[request.id] = handle
            self._lock.notify_all()
        return handle

    def generate(self, prompt=None, **options) -> RequestOutput:
        """Submit one request and wait for it."""
        return self.submit(prompt, **options).result()

    def abort(self, handle: RequestHandle) -> None:
        """End a request now (its completions finish with ``"abort"``, its blocks go back)."""
        with self._lock:
            if handle.id in self._handles and not handle.finished:
                self._aborts.append(handle)
                self._lock.notify_all()

    def metrics(self) -> dict[str, Any]:
        """A snapshot of the counters and gauges (what ``llmc serve`` exports). The scheduler's
        gauges are as the loop last published them, between two steps."""
        with self._lock:
            return {
                **self._gauges, "waiting": self._gauges["waiting"] + len(self._inbox),
                "prompt_tokens": self._stats["prompt_tokens"], "generation_tokens": self._stats["generation_tokens"],
                "steps": self._stats["steps"], "step_tokens": self._stats["step_tokens"],
                "step_seconds": self._stats["step_seconds"],
                "requests_finished": dict(self._finished),
                "time_to_first_token_seconds": self._ttft.snapshot(),
                "inter_token_latency_seconds": self._itl.snapshot(),
                "e2e_request_latency_seconds": self._e2e.snapshot(),
            }

    def close(self, abort: bool = True) -> None:
        """Stop taking requests; abort what is in flight (or, ``abort=False``, let it finish);
        stop the loop and give the model back."""
        with self._lock:
            self._closing = True
            if abort:
                self._aborts.extend(self._handles.values())
            self._lock.notify_all()
        self._thread.join()
        self.model.take_over(None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._inbox or self._aborts or self.scheduler.has_work() or self._closing):
                    self._lock.wait()
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                if self._closing and not (inbox or aborts or self.scheduler.has_work()):
                    return
            try:
                self._iterate(inbox, aborts)
            except Exception as exc:             # a fault of the engine itself: fail, never hang, its callers
                self._reset(LlmcError(f"the engine failed and dropped its requests: {exc!r}"))
            self._publish()

    def _iterate(self, inbox: list[Request], aborts: list[RequestHandle]) -> None:
        """One turn of the loop: take new requests and aborts, run one step, sample."""
        for request in inbox:
            self._start(request)
        for handle in aborts:
            for seq in [s for s in self.scheduler.running + list(self.scheduler.waiting) if s.owner.handle is handle]:
                self._finish(seq, "abort")
        plan = self.scheduler.schedule()
        if plan is None:
            if self.scheduler.waiting:           # nothing runs and the head cannot start: refuse it
                self._finish(self.scheduler.waiting[0], "error",
                             LlmcError("the request cannot be scheduled in this engine's KV pool"))
            return
        with self._lock:
            self._unstarted.difference_update(seq.owner.handle.id for seq, _ in plan.chunks)
        try:
            began = time.perf_counter()
            logits = self.model.run_batch(plan.batch)
            ran = time.perf_counter() - began
            self.scheduler.complete(plan)
            with self._lock:
                self._stats["steps"] += 1
                self._stats["step_tokens"] += int(plan.batch.tokens.size)
                self._stats["step_seconds"] += ran
            if plan.sampled:
                self._sample(plan, logits)
        except Exception as exc:                 # this step's requests fail; the engine goes on
            error = exc if isinstance(exc, LlmcError) else LlmcError(f"the step failed: {exc!r}")
            for seq, _ in plan.chunks:
                if not seq.done:
                    self._finish(seq, "error", error)

    def _reset(self, error: LlmcError) -> None:
        """End every request in flight with ``error`` and start over with an empty pool."""
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
            self._unstarted.clear()
        for handle in handles:
            for completion in handle.open_completions():
                handle._push(Delta(completion, [], None, finish_reason="error"), error)
        self.pool = BlockPool(self.model.kv_blocks, self.model.layout.block_size)
        self.scheduler = Scheduler(self.pool, self.scheduler.max_running, self.scheduler.max_step_tokens,
                                   self.scheduler.width)

    def _publish(self) -> None:
        """The scheduler's gauges as they stand between two steps, for metrics()."""
        running = {seq.owner.handle.id for seq in self.scheduler.running}
        waiting = {seq.owner.handle.id for seq in self.scheduler.waiting} - running
        pool = self.pool
        gauges = {
            "running": len(running), "waiting": len(waiting), "preemptions": self.scheduler.preempted,
            "kv_blocks": pool.blocks, "kv_blocks_used": pool.used, "kv_blocks_free": pool.available,
            "kv_blocks_cached": pool.cached, "kv_usage": pool.used / pool.blocks,
            "prefix_cache_query_tokens": self.scheduler.prefix_query_tokens,
            "prefix_cache_hit_tokens": self.scheduler.prefix_hit_tokens,
        }
        with self._lock:
            self._gauges = gauges

    def _start(self, request: Request) -> None:
        handle = self._handles[request.id]
        tokenizer = self.model.tokenizer
        leader = None
        for index, params in enumerate(request.params):
            seq = Sequence(list(request.prompt_ids), len(request.prompt_ids), leader=leader)
            seq.owner = _Completion(handle, index, params, np.random.default_rng(params.seed),
                                    TextStream(tokenizer, request.stops) if tokenizer else None)
            leader = leader or seq
            self.scheduler.add(seq)
        with self._lock:
            self._stats["prompt_tokens"] += len(request.prompt_ids)

    def _sample(self, plan: Plan, logits: np.ndarray) -> None:
        seqs = plan.sampled
        owners = [s.owner for s in seqs]
        rows = logits[:len(seqs)]
        tokens = sample_rows(rows, [o.params for o in owners], [o.rng for o in owners], [s.tokens for s in seqs],
                             [len(s.tokens) - s.prompt_len for s in seqs])
        now = time.monotonic()
        with self._lock:
            self._stats["generation_tokens"] += len(seqs)
            for seq, owner in zip(seqs, owners):
                handle = owner.handle
                if handle.first_token_at is None:
                    handle.first_token_at = now
                    handle.cached_tokens = seq.cached
                    self._ttft.observe(now - handle.request.arrival)
                elif owner.generated:
                    self._itl.observe(now - owner.last_token_at)
                owner.last_token_at = now
                owner.generated += 1
        for i, (seq, owner, token) in enumerate(zip(seqs, owners, tokens.tolist())):
            handle, request = owner.handle, owner.handle.request
            if token in request.stop_token_ids:
                self._finish(seq, "stop")
                continue
            logprob = None
            if request.logprobs:
                value, top = top_logprobs(rows[i], [token], request.top_logprobs)[0]
                logprob = [TokenLogprob(token, value, tuple(top))]
            seq.tokens.append(token)
            text = owner.text.push(token) if owner.text else None
            if owner.text and owner.text.stopped:
                self._finish(seq, "stop", delta=Delta(owner.index, [token], text, logprob))
            elif owner.generated >= request.max_tokens:
                self._finish(seq, "length", delta=Delta(owner.index, [token], text, logprob))
            else:
                handle._push(Delta(owner.index, [token], text, logprob))

    def _finish(self, seq: Sequence, reason: str, error: LlmcError | None = None, delta: Delta | None = None) -> None:
        """End one sequence: its last delta (with the text held back), its blocks back to the pool."""
        owner = seq.owner
        self.scheduler.remove(seq)
        delta = delta or Delta(owner.index, [], "" if owner.text else None)
        if owner.text is not None and reason in ("stop", "length"):       # the text held back
            delta.text = (delta.text or "") + owner.text.finish()
        delta.finish_reason = reason
        handle = owner.handle
        handle._push(delta, error)
        with self._lock:
            self._finished[reason] += 1
            if handle.finished:
                self._handles.pop(handle.id, None)
                self._unstarted.discard(handle.id)
                self._e2e.observe(time.monotonic() - handle.request.arrival)

