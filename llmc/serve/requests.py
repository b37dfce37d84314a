"""What a request to the engine is, what comes back, and the handle a caller reads it through.

A request is checked whole when it is submitted (``make_request``), in the caller's thread, so a
bad one raises there and never reaches the engine's loop. Its results arrive as ``Delta``s, one
per new token of one of its ``n`` completions, readable from a ``RequestHandle`` as they come
(``for delta in handle``, ``async for delta in handle``) or all at once (``handle.result()``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

from llmc.errors import LlmcError, is_int
from llmc.runtime.model import check_token_ids
from llmc.runtime.sampler import SamplingParams
from llmc.runtime.text import check_stops

MAX_N = 64
MAX_TOP_LOGPROBS = 20
_ids = itertools.count()


class ContextLengthError(LlmcError):
    """The prompt, or the prompt and max_tokens, do not fit the model's context."""


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]      # the most likely tokens (id, logprob), best first


@dataclass
class Delta:
    """New output of one completion: its tokens since the last delta, the text they completed
    (None without a tokenizer), their log-probabilities if asked for, and, on the last delta,
    why it ended: ``"stop"`` (end of sequence, a stop token or string), ``"length"``
    (``max_tokens``), ``"abort"``, or ``"error"`` (the step failed: the iteration raises it)."""

    index: int
    token_ids: list[int]
    text: Optional[str]
    logprobs: Optional[list[TokenLogprob]] = None
    finish_reason: Optional[str] = None


@dataclass
class Completion:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: Optional[str] = None
    logprobs: Optional[list[TokenLogprob]] = None
    finish_reason: Optional[str] = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    completions: list[Completion]
    cached_tokens: int                       # prompt tokens the prefix cache supplied

    @property
    def text(self) -> Optional[str]:
        return self.completions[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.completions[0].token_ids


@dataclass
class Request:
    """A checked request: prompt ids, limits and one SamplingParams per completion."""

    id: str
    prompt_ids: list[int]
    max_tokens: int
    params: list[SamplingParams]
    stops: list[str]
    stop_token_ids: frozenset[int]
    logprobs: bool
    top_logprobs: int
    arrival: float


def make_request(model, prompt=None, *, messages=None, tools=None, max_tokens: int | None = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 seed: int | None = None, stop=None, stop_token_ids: Sequence[int] = (), n: int = 1,
                 logprobs: bool = False, top_logprobs: int = 0, ignore_eos: bool = False) -> Request:
    """A request for ``model`` checked whole, or an LlmcError saying what to change."""
    tokenizer = model.tokenizer
    if (prompt is None) == (messages is None):
        raise LlmcError("give a request either a prompt (text or token ids) or chat messages")
    if messages is not None:
        if tokenizer is None:
            raise LlmcError("this artifact has no tokenizer, so it cannot take chat messages")
        if tools is not None and not (isinstance(tools, (list, tuple)) and all(isinstance(t, dict) for t in tools)):
            raise LlmcError("tools must be a list of objects (function definitions)")
        prompt = tokenizer.render_chat(messages, list(tools) if tools else None)
    elif tools is not None:
        raise LlmcError("tools go with chat messages, not with a plain prompt")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise LlmcError("this artifact has no tokenizer (it was built without one): pass token ids")
        prompt_ids = tokenizer.encode(prompt)
    else:
        prompt_ids = check_token_ids(prompt, model.vocab_size, "a prompt of token ids").tolist()
    if not prompt_ids:
        raise LlmcError("the prompt is empty: give at least one token")
    room = model.max_context - len(prompt_ids)
    if room < 1:
        raise ContextLengthError(f"the prompt's {len(prompt_ids)} tokens leave no room in the context of "
                                 f"{model.max_context}: shorten it, or load the model with a larger max_context")
    if max_tokens is None:
        max_tokens = room
    if not is_int(max_tokens) or max_tokens < 1:
        raise LlmcError(f"max_tokens must be an int >= 1, not {max_tokens!r}")
    if max_tokens > room:
        raise ContextLengthError(f"the prompt's {len(prompt_ids)} tokens and max_tokens {max_tokens} do not fit the "
                                 f"context of {model.max_context}: ask for at most {room} tokens, or shorten the "
                                 "prompt")
    if not is_int(n) or not 1 <= n <= MAX_N:
        raise LlmcError(f"n must be an int from 1 to {MAX_N}, not {n!r}")
    if not isinstance(logprobs, bool):
        raise LlmcError(f"logprobs must be true or false, not {logprobs!r}")
    if not is_int(top_logprobs) or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise LlmcError(f"top_logprobs must be an int from 0 to {MAX_TOP_LOGPROBS}, not {top_logprobs!r}")
    stops = check_stops(stop)
    if stops and tokenizer is None:
        raise LlmcError("stop strings need a tokenizer, and this artifact has none: use stop_token_ids")
    stop_ids = set(check_token_ids(list(stop_token_ids or ()), model.vocab_size, "stop_token_ids").tolist())
    if not ignore_eos:
        stop_ids |= model.eos_token_ids
    base = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed, presence_penalty,
                          frequency_penalty)
    # Completion i draws from seed + i: the first is what generate(seed=seed) gives.
    params = [base if seed is None or i == 0 else dataclasses.replace(base, seed=(seed + i) % 2 ** 63)
              for i in range(n)]
    return Request(f"req-{next(_ids)}", prompt_ids, int(max_tokens), params, stops, frozenset(stop_ids),
                   logprobs or top_logprobs > 0, int(top_logprobs), time.monotonic())


class RequestHandle:
    """A submitted request. Iterate it (sync or async) for its deltas as they come, or call
    ``result()`` for the whole output; ``abort()`` ends it early. Deltas of a failed request end
    with the LlmcError that stopped it raised by the iteration (and by ``result()``)."""

    def __init__(self, engine, request: Request):
        self._engine = engine
        self.request = request
        self.id = request.id
        self.prompt_token_ids = request.prompt_ids
        self._cond = threading.Condition()
        self._deltas: deque[Delta] = deque()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._completions = [Completion(i, logprobs=[] if request.logprobs else None) for i in range(len(request.params))]
        self._open = len(request.params)
        self._error: LlmcError | None = None
        self.cached_tokens = 0
        self.first_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return self._open == 0

    def abort(self) -> None:
        self._engine.abort(self)

    def open_completions(self) -> list[int]:
        """The indices of the completions that have not ended yet."""
        with self._cond:
            return [c.index for c in self._completions if c.finish_reason is None]

    # -- the engine's side -------------------------------------------------------------------------

    def _push(self, delta: Delta, error: LlmcError | None = None) -> None:
        with self._cond:
            c = self._completions[delta.index]
            c.token_ids.extend(delta.token_ids)
            if delta.text is not None:
                c.text = (c.text or "") + delta.text
            if delta.logprobs and c.logprobs is not None:
                c.logprobs.extend(delta.logprobs)
            if delta.finish_reason is not None:
                c.finish_reason = delta.finish_reason
                self._open -= 1
                if error is not None and self._error is None:
                    self._error = error
            self._deltas.append(delta)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:             # that event loop has closed: nobody is waiting
                pass

    # -- the caller's side -----------------------------------------------------------------------

    def __iter__(self):
        while True:
            with self._cond:
                while not self._deltas and self._open:
                    self._cond.wait()
                if not self._deltas:
                    break
                delta = self._deltas.popleft()
            yield delta
        if self._error is not None:
            raise self._error

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        loop = asyncio.get_running_loop()
        while True:
            event = None
            with self._cond:
                if self._deltas:
                    delta = self._deltas.popleft()
                elif not self._open:
                    break
                else:
                    event = asyncio.Event()
                    self._waiters.append((loop, event))
            if event is not None:
                await event.wait()
                continue
            yield delta
        if self._error is not None:
            raise self._error

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Wait for every completion to end and return them (deltas stay readable by iteration)."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._open, timeout):
                raise LlmcError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return RequestOutput(self.id, list(self.prompt_token_ids), self._completions, self.cached_tokens)
