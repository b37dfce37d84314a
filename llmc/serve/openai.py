"""The OpenAI API as the engine's requests and outputs: parsing a request body into
``Engine.submit`` options, and building the response objects and stream chunks from the engine's
deltas. Pure data in, data out: the HTTP side (``llmc.serve.http``) owns sockets and timing.

Fields follow OpenAI's API, with vLLM's extensions (``top_k``, ``min_p``, ``repetition_penalty``,
``stop_token_ids``, ``ignore_eos``). A field OpenAI does not have is ignored, as OpenAI does; a
known field with a bad value, or one this server cannot honour (a logit bias, a forced tool
call), is refused with a 400 that names it.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from llmc.errors import LlmcError, is_int
from llmc.runtime.text import check_stops
from llmc.serve.engine import EngineClosedError, QueueFullError
from llmc.serve.requests import MAX_N, MAX_TOP_LOGPROBS, ContextLengthError, Delta, TokenLogprob

MAX_STOPS = 16
MAX_LEGACY_LOGPROBS = 5           # /v1/completions' logprobs, as OpenAI caps it
COMPLETIONS_MAX_TOKENS = 16       # OpenAI's default max_tokens for /v1/completions


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error envelope."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# -- reading fields --------------------------------------------------------------------------------

def _number(body: dict, name: str, default, low: float, high: float, open_low: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{name} must be a number, not {value!r}", name)
    if value < low or value > high or (open_low and value == low):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise bad(f"{name} must be in {interval}, not {value!r}", name)
    return value


def _int(body: dict, name: str, default, low: int, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value):
        raise bad(f"{name} must be an integer, not {value!r}", name)
    if value < low or (high is not None and value > high):
        raise bad(f"{name} must be {f'from {low} to {high}' if high is not None else f'at least {low}'}, "
                  f"not {value!r}", name)
    return int(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, not {value!r}", name)
    return value


def _unsupported(body: dict, name: str, neutral, instead: str) -> None:
    value = body.get(name)
    if value is not None and value != neutral:
        raise bad(f"{name} is not supported by this server{instead}", name)


@dataclass
class Call:
    """A parsed request: what to submit (once per prompt), and how to answer."""

    kind: str                                   # "chat" or "completion"
    prompts: list[Any]                          # completion: each prompt; chat: [None]
    options: dict[str, Any]                     # Engine.submit's keyword arguments
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: Optional[int] = None              # the top alternatives per token, None: no logprobs
    n: int = 1


def _common(body: dict, served: str, max_tokens_default: int | None) -> tuple[dict[str, Any], bool, bool, int]:
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(404, f"the model {model!r} does not exist: this server serves {served!r}", param="model",
                       code="model_not_found", type="not_found_error")
    max_tokens = _int(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", max_tokens_default, 1)
    top_k = _int(body, "top_k", 0, -1)
    seed = body.get("seed")
    if seed is not None and not (is_int(seed) and 0 <= seed < 2 ** 63):
        raise bad(f"seed must be an integer in [0, 2**63), not {seed!r}", "seed")
    try:
        stops = check_stops(body.get("stop"))
    except LlmcError as exc:
        raise bad(str(exc), "stop") from None
    if len(stops) > MAX_STOPS:
        raise bad(f"stop takes at most {MAX_STOPS} strings, not {len(stops)}", "stop")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and (not isinstance(stop_ids, list) or not all(is_int(t) for t in stop_ids)):
        raise bad("stop_token_ids must be a list of integers", "stop_token_ids")
    _unsupported(body, "logit_bias", {}, "")
    n = _int(body, "n", 1, 1, MAX_N)
    stream = _bool(body, "stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise bad("stream_options goes only with stream: true", "stream_options")
        if not isinstance(stream_options, dict):
            raise bad("stream_options must be an object", "stream_options")
        include_usage = _bool(stream_options, "include_usage")
    options = dict(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        top_k=max(top_k, 0),                     # -1 and 0 both mean no limit (vLLM)
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, open_low=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=None if seed is None else int(seed),
        stop=stops, stop_token_ids=[int(t) for t in stop_ids or ()], n=n,
        ignore_eos=_bool(body, "ignore_eos"),
    )
    if options["min_p"] >= 1:
        raise bad("min_p must be in [0, 1)", "min_p")
    return options, stream, include_usage, n


def _content(message: dict, i: int) -> dict:
    """A message with list-of-parts content joined into one string (text parts only)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad(f"message {i}: this server takes text content only, not {kind!r} parts", "messages")
        texts.append(part["text"])
    return {**message, "content": "".join(texts)}


def parse_chat(body: Any, served: str) -> Call:
    """A /v1/chat/completions body, checked, or an ApiError."""
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    options, stream, include_usage, n = _common(body, served, None)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    options["messages"] = [_content(m, i) if isinstance(m, dict) else m for i, m in enumerate(messages)]
    want_logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if top and not want_logprobs:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    options.update(logprobs=want_logprobs, top_logprobs=top)
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if choice not in (None, "none", "auto"):
        raise bad("tool_choice can be 'none' or 'auto' here: this server cannot force a tool call", "tool_choice")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise bad("tools must be a list of tool objects", "tools")
        if tools and choice != "none":
            options["tools"] = tools
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("response_format other than {'type': 'text'} is not supported by this server yet",
                  "response_format")
    return Call("chat", [None], options, stream, include_usage, logprobs=top if want_logprobs else None, n=n)


def parse_completion(body: Any, served: str) -> Call:
    """A /v1/completions body, checked, or an ApiError."""
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    options, stream, include_usage, n = _common(body, served, COMPLETIONS_MAX_TOKENS)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(is_int(t) for t in p)
                                                     for p in prompt):
        prompts = prompt
    else:
        raise bad("prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                  "prompt")
    logprobs = _int(body, "logprobs", None, 0, MAX_LEGACY_LOGPROBS)
    echo = _bool(body, "echo")
    if echo and logprobs is not None:
        raise bad("echo with logprobs is not supported (it needs the prompt's log-probabilities)", "echo")
    _unsupported(body, "suffix", "", "")
    best_of = _int(body, "best_of", None, 1)
    if best_of is not None and best_of != n:
        raise bad("best_of other than n is not supported by this server", "best_of")
    if logprobs is not None:
        options.update(logprobs=True, top_logprobs=logprobs)
    return Call("completion", prompts, options, stream, include_usage, echo, logprobs, n)


# -- answering ------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass
class Answer:
    """Builds one request's response (or stream chunks) from its handles' deltas. Choice
    ``i * n + j`` is completion ``j`` of prompt ``i``, as OpenAI numbers them."""

    call: Call
    model: str
    tokenizer: Any
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    _started: set = field(default_factory=set)     # choices whose first chunk went out
    _texts: dict = field(default_factory=dict)     # token id -> its text, for logprobs

    def __post_init__(self):
        self.id = self.id or new_id("chatcmpl" if self.call.kind == "chat" else "cmpl")

    def _token(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _logprobs(self, entries: list[TokenLogprob], offset: int = 0) -> dict:
        if self.call.kind == "chat":
            def one(token_id: int, logprob: float) -> dict:
                text = self._token(token_id)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
            return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                                for e in entries]}
        tokens = [self._token(e.token_id) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token(t): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}

    def _object(self, chunk: bool) -> str:
        if self.call.kind == "chat":
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"

    def _head(self, chunk: bool) -> dict:
        return {"id": self.id, "object": self._object(chunk), "created": self.created, "model": self.model}

    def chunks(self, prompt_index: int, delta: Delta, prompt_text: str | None = None) -> list[dict]:
        """The stream chunks one delta makes (a chat choice's first also carries its role)."""
        index = prompt_index * self.call.n + delta.index
        out = []
        logprobs = self._logprobs(delta.logprobs) if delta.logprobs and self.call.logprobs is not None else None
        if self.call.kind == "chat":
            if index not in self._started:
                self._started.add(index)
                out.append({**self._head(True), "choices": [{"index": index, "delta": {"role": "assistant",
                                                                                    "content": ""},
                                                             "logprobs": None, "finish_reason": None}]})
            text = delta.text or ""
            if not text and not logprobs and delta.finish_reason is None:
                return out
            body = {"content": text} if text or delta.finish_reason is None else {}
            out.append({**self._head(True), "choices": [{"index": index, "delta": body, "logprobs": logprobs,
                                                         "finish_reason": delta.finish_reason}]})
        else:
            text = delta.text or ""
            if self.call.echo and index not in self._started:
                self._started.add(index)
                text = (prompt_text or "") + text
            if not text and not logprobs and delta.finish_reason is None:
                return out
            out.append({**self._head(True), "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                                         "finish_reason": delta.finish_reason}]})
        if self.call.include_usage:
            for chunk in out:
                chunk["usage"] = None
        return out

    def usage(self, outputs) -> dict:
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        completion = sum(len(c.token_ids) for o in outputs for c in o.completions)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in outputs)}}

    def usage_chunk(self, outputs) -> dict:
        return {**self._head(True), "choices": [], "usage": self.usage(outputs)}

    def response(self, outputs, prompt_texts: list[str | None]) -> dict:
        """The whole (non-streamed) response for the finished outputs, one per prompt."""
        choices = []
        for i, output in enumerate(outputs):
            for c in output.completions:
                logprobs = self._logprobs(c.logprobs) if c.logprobs is not None and self.call.logprobs is not None \
                    else None
                if self.call.kind == "chat":
                    choices.append({"index": i * self.call.n + c.index,
                                    "message": {"role": "assistant", "content": c.text or ""},
                                    "logprobs": logprobs, "finish_reason": c.finish_reason})
                else:
                    prefix = (prompt_texts[i] or "") if self.call.echo else ""
                    choices.append({"index": i * self.call.n + c.index, "text": prefix + (c.text or ""),
                                    "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {**self._head(False), "choices": choices, "usage": self.usage(outputs)}


def engine_error(exc: LlmcError) -> ApiError:
    """The answer for an error the engine raised at submit."""
    if isinstance(exc, QueueFullError):
        return ApiError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, EngineClosedError):
        return ApiError(503, "the server is shutting down: retry on another replica", "service_unavailable_error",
                        headers={"Retry-After": "5"})
    if isinstance(exc, ContextLengthError):
        return bad(str(exc), "messages", "context_length_exceeded")
    return bad(str(exc))
