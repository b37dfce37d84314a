"""``llmc serve``: the OpenAI-compatible HTTP server on the engine — a plain ASGI application run by
uvicorn (the ``serve`` extra).

Why plain ASGI rather than starlette or FastAPI: everything hard here happens at the level of
ASGI messages — capping a body while it is read, noticing a client that leaves while its prompt
is still being computed (before any token is written), answering every failure in OpenAI's
envelope, draining on SIGTERM — and a framework's helpers either hide those messages or change
their behaviour between versions (starlette's streaming response stopped listening for
disconnects with ASGI spec 2.4). Eight fixed routes are a dict; uvicorn (and h11) is the whole
stack.

A request's life: the API key, the server's state (503 while loading or draining), the body
(413 past ``max_body_bytes``, read before anything is submitted, so a huge or malformed body
never holds an engine slot), the fields (``llmc.serve.openai``), ``Engine.submit`` in a worker
thread (tokenizing a long prompt must not stall the event loop; 429 when the queue is full),
then the answer — raced against the client leaving (which aborts the request and frees its KV
blocks at once) and ``request_timeout``.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import signal
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable

from llmc.errors import LlmcError, is_int
from llmc.serve.metrics import prometheus
from llmc.serve.openai import ApiError, Answer, Call, engine_error, parse_chat, parse_completion

DEFAULT_MAX_BODY = 4 << 20


def log(message: str) -> None:
    print(f"llmc serve: {message}", file=sys.stderr, flush=True)


class ClientGone(Exception):
    """The client closed the connection."""


class Exchange:
    """One HTTP request and its answer, at the level of ASGI messages."""

    def __init__(self, scope, receive, send):
        self.scope, self.receive, self.send_ = scope, receive, send
        self.method = scope["method"]
        self.path = scope["path"]
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.status: int | None = None          # set when the answer starts
        self.streaming = False

    async def body(self, limit: int) -> Any:
        """The body parsed as JSON; 413 past ``limit`` bytes (read no further), 400 if not JSON."""
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large(int(declared), limit)
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large(size, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        if not raw:
            raise ApiError(400, "the request needs a JSON body")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None

    async def until_gone(self) -> None:
        """Return when the client disconnects (read after the body: nothing else can arrive)."""
        while (await self.receive())["type"] != "http.disconnect":
            pass

    async def start(self, status: int, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        raw = [(b"content-type", content_type.encode())]
        raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
        await self.send_({"type": "http.response.start", "status": status, "headers": raw})

    async def write(self, data: bytes, more: bool = True) -> None:
        await self.send_({"type": "http.response.body", "body": data, "more_body": more})

    async def json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        await self.start(status, "application/json", headers)
        await self.write(dumps(body), more=False)

    async def text(self, status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> None:
        await self.start(status, content_type)
        await self.write(body.encode(), more=False)

    async def error(self, error: ApiError) -> None:
        if self.status is None:
            await self.json(error.status, error.body(), error.headers)
        elif self.streaming:                      # the stream has begun: say it in the stream, then end it
            await self.write(b"data: " + dumps(error.body()) + b"\n\ndata: [DONE]\n\n", more=False)

    async def open_stream(self) -> None:
        self.streaming = True
        await self.start(200, "text/event-stream", {"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def event(self, obj: Any) -> None:
        await self.write(b"data: " + dumps(obj) + b"\n\n")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body ({size} bytes or more) is larger than this server's limit of {limit} "
                         "bytes (--max-body-bytes)", code="request_too_large")


class App:
    """The ASGI application: state (loading, ready, draining), routes, the engine."""

    def __init__(self, path: str | Path, *, model_name: str, api_key: str | None = None,
                 request_timeout: float | None = 600.0, max_body_bytes: int = DEFAULT_MAX_BODY,
                 engine_options: dict | None = None, load_options: dict | None = None):
        self.path = Path(path)
        self.model_name = model_name
        self.api_key = api_key
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes
        self.engine_options = engine_options or {}
        self.load_options = load_options or {}
        self.state = "loading"
        self.engine = None
        self.load_error: BaseException | None = None
        self.started = time.time()
        self.in_flight: set = set()                # the handles of requests being answered
        self.responses: Counter = Counter()        # answers by status code, for /metrics
        self.on_failure: Callable[[], None] | None = None
        self._timer: threading.Timer | None = None
        self._loader: threading.Thread | None = None
        self.routes: dict[tuple[str, str], Callable[[Exchange], Awaitable[None]]] = {
            ("GET", "/health"): self.health, ("GET", "/metrics"): self.metrics,
            ("GET", "/v1/models"): self.models, ("POST", "/v1/chat/completions"): self.chat,
            ("POST", "/v1/completions"): self.completions, ("POST", "/tokenize"): self.tokenize,
            ("POST", "/detokenize"): self.detokenize,
        }

    # -- life ------------------------------------------------------------------------------------

    def start_loading(self) -> None:
        """Load in a thread (/health answers 503 meanwhile), unless loading began already (a host
        such as Ray Serve may load in its replica's constructor, then run the lifespan too)."""
        if self.state == "loading" and self._loader is None:
            self._loader = threading.Thread(target=self.load, name="llmc-load", daemon=True)
            self._loader.start()

    def load(self) -> None:
        """Load the artifact and start the engine."""
        from llmc.runtime.model import load
        from llmc.serve.engine import Engine

        began = time.perf_counter()
        try:
            model = load(self.path, **self.load_options)
            if model.tokenizer is None:
                raise LlmcError(f"{self.path} has no tokenizer: the server needs an artifact built with one")
            self.engine = Engine(model, **self.engine_options)
        except BaseException as exc:              # reported by the runner, which exits 1
            self.load_error = exc
            self.state = "failed"
            if self.on_failure:
                self.on_failure()
            return
        if self.state == "loading":              # not if SIGTERM came while it loaded
            self.state = "ready"
        log(f"ready: {self.model_name} (loaded in {time.perf_counter() - began:.1f} s, "
            f"{self.engine.pool.blocks} KV blocks, context {model.max_context})")

    def drain(self, grace: float) -> None:
        """Stop taking requests (503); abort what is still running after ``grace`` seconds."""
        if self.state == "draining":
            return
        self.state = "draining"
        log(f"shutting down: {len(self.in_flight)} requests in flight, {grace:g} s to finish")
        if self.engine is not None:
            self._timer = threading.Timer(grace, self.abort_all)
            self._timer.daemon = True
            self._timer.start()

    def abort_all(self) -> None:
        for handle in list(self.in_flight):
            handle.abort()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.engine is not None:
            self.engine.close(abort=True)

    # -- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return
        ex = Exchange(scope, receive, send)
        try:
            await self._route(ex)
        except ClientGone:
            pass
        except ApiError as error:
            await ex.error(error)
        except Exception as exc:                  # a bug: the client gets a one-line 500, the log the traceback
            log(f"internal error on {ex.method} {ex.path}:\n{traceback.format_exc().rstrip()}")
            await ex.error(ApiError(500, f"internal error: {type(exc).__name__} (a bug in llmc; the server log "
                                         "has the details)", "server_error"))
        finally:
            if ex.status is not None:
                self.responses[ex.status] += 1

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start_loading()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.get_running_loop().run_in_executor(None, self.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _route(self, ex: Exchange) -> None:
        path = ex.path.rstrip("/") or "/"
        handler = self.routes.get((ex.method, path))
        if handler is None and path.startswith("/v1/models/") and ex.method == "GET":
            handler = functools.partial(self.model_info, name=path[len("/v1/models/"):])
        if handler is None:
            allowed = sorted(m for m, p in self.routes if p == path)
            if allowed:
                raise ApiError(405, f"{path} takes {' or '.join(allowed)}, not {ex.method}", code="method_not_allowed",
                               headers={"Allow": ", ".join(allowed)})
            raise ApiError(404, f"no such route: {ex.method} {ex.path}", "not_found_error", code="not_found")
        if path not in ("/health", "/metrics") and self.api_key is not None:
            given = ex.headers.get("authorization", "")
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'",
                               "authentication_error", code="invalid_api_key")
        await handler(ex)

    def _ready(self):
        if self.state != "ready":
            message = {"loading": "the model is still loading: retry shortly",
                       "draining": "the server is shutting down: retry on another replica",
                       "failed": "the model failed to load"}[self.state]
            raise ApiError(503, message, "service_unavailable_error", headers={"Retry-After": "1"})
        return self.engine

    # -- routes ----------------------------------------------------------------------------------

    async def health(self, ex: Exchange) -> None:
        if self.state == "ready":
            await ex.json(200, {"status": "ok"})
        else:
            await ex.json(503, {"status": self.state}, {"Retry-After": "1"})

    async def metrics(self, ex: Exchange) -> None:
        snapshot = self.engine.metrics() if self.engine is not None else None
        text = prometheus(snapshot, self.model_name, self.responses, self.state == "ready", self.started)
        await ex.text(200, text, "text/plain; version=0.0.4; charset=utf-8")

    def _model_card(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": int(self.started), "owned_by": "llmc"}
        if self.engine is not None:
            card["max_model_len"] = self.engine.model.max_context
        return card

    async def models(self, ex: Exchange) -> None:
        await ex.json(200, {"object": "list", "data": [self._model_card()]})

    async def model_info(self, ex: Exchange, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist: this server serves {self.model_name!r}",
                           "not_found_error", "model", "model_not_found")
        await ex.json(200, self._model_card())

    async def tokenize(self, ex: Exchange) -> None:
        body = await ex.body(self.max_body_bytes)
        engine = self._ready()
        tokenizer = engine.model.tokenizer
        if not isinstance(body, dict) or (body.get("prompt") is None) == (body.get("messages") is None):
            raise ApiError(400, "give either prompt (a string) or messages (a chat)")
        if body.get("model") not in (None, self.model_name):
            raise ApiError(404, f"the model {body['model']!r} does not exist", "not_found_error", "model",
                           "model_not_found")
        prompt = body.get("prompt")
        if prompt is None:
            try:
                prompt = await _in_thread(tokenizer.render_chat, body["messages"])
            except LlmcError as exc:
                raise ApiError(400, str(exc), param="messages") from None
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string", param="prompt")
        try:
            tokens = await _in_thread(tokenizer.encode, prompt)
        except LlmcError as exc:
            raise ApiError(400, str(exc), param="prompt") from None
        await ex.json(200, {"count": len(tokens), "max_model_len": engine.model.max_context, "tokens": tokens})

    async def detokenize(self, ex: Exchange) -> None:
        body = await ex.body(self.max_body_bytes)
        engine = self._ready()
        tokens = body.get("tokens") if isinstance(body, dict) else None
        vocab = engine.model.vocab_size
        if not isinstance(tokens, list) or not all(is_int(t) and 0 <= t < vocab for t in tokens):
            raise ApiError(400, f"tokens must be a list of token ids in [0, {vocab})", param="tokens")
        await ex.json(200, {"prompt": engine.model.tokenizer.decode(tokens)})

    async def chat(self, ex: Exchange) -> None:
        body = await ex.body(self.max_body_bytes)
        self._ready()
        await self._generate(ex, parse_chat(body, self.model_name))

    async def completions(self, ex: Exchange) -> None:
        body = await ex.body(self.max_body_bytes)
        self._ready()
        await self._generate(ex, parse_completion(body, self.model_name))

    # -- generation ------------------------------------------------------------------------------

    async def _generate(self, ex: Exchange, call: Call) -> None:
        engine = self.engine
        handles = []
        try:
            handles = await _in_thread(self._submit, engine, call)
        except LlmcError as exc:
            raise engine_error(exc) from None
        self.in_flight.update(handles)
        answer = Answer(call, self.model_name, engine.model.tokenizer)
        prompts = [p if isinstance(p, str) else None for p in call.prompts]
        if call.echo:
            prompts = [p if p is not None else engine.model.tokenizer.decode(h.prompt_token_ids)
                       for p, h in zip(prompts, handles)]
        work = asyncio.ensure_future(self._stream(ex, answer, handles, prompts) if call.stream
                                     else self._whole(ex, answer, handles, prompts))
        gone = asyncio.ensure_future(ex.until_gone())
        try:
            done, _ = await asyncio.wait({work, gone}, timeout=self.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                work.result()                     # its errors are the request's
            elif gone not in done:                # the deadline
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                raise ApiError(408, f"the request did not finish within the server's --request-timeout of "
                                    f"{self.request_timeout:g} s: ask for fewer tokens", "timeout_error",
                               code="request_timeout")
        finally:
            for task in (work, gone):
                task.cancel()
            for handle in handles:                # the client left, the deadline passed, or it failed
                if not handle.finished:
                    handle.abort()
            self.in_flight.difference_update(handles)

    @staticmethod
    def _submit(engine, call: Call) -> list:
        handles = []
        try:
            for prompt in call.prompts:
                handles.append(engine.submit(prompt, **call.options))
        except BaseException:
            for handle in handles:                # all of a request's prompts run, or none
                handle.abort()
            raise
        return handles

    async def _whole(self, ex: Exchange, answer: Answer, handles: list, prompts: list) -> None:
        for handle in handles:
            await _drain(handle)
        outputs = [handle.result() for handle in handles]
        if any(c.finish_reason == "abort" for o in outputs for c in o.completions):
            raise shut_down()                     # aborted by the server, not by its client
        await ex.json(200, answer.response(outputs, prompts))

    async def _stream(self, ex: Exchange, answer: Answer, handles: list, prompts: list) -> None:
        await ex.open_stream()
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, handle) -> None:
            try:
                async for delta in handle:
                    queue.put_nowait((i, delta, None))
            except LlmcError as exc:
                queue.put_nowait((i, None, exc))
            queue.put_nowait((i, None, None))

        pumps = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
        try:
            open_ = len(handles)
            while open_:
                i, delta, error = await queue.get()
                if error is not None:
                    raise ApiError(500, f"generation failed: {error}", "server_error")
                if delta is None:
                    open_ -= 1
                    continue
                if delta.finish_reason == "abort":     # only the server aborts a request it still streams
                    raise shut_down()
                for chunk in answer.chunks(i, delta, prompts[i]):
                    await ex.event(chunk)
            if answer.call.include_usage:
                await ex.event(answer.usage_chunk([h.result() for h in handles]))
            await ex.write(b"data: [DONE]\n\n", more=False)
        finally:
            for task in pumps:
                task.cancel()


def shut_down() -> ApiError:
    """The answer for a request the server aborted while draining."""
    return ApiError(503, "the server shut down before the request finished: retry on another replica",
                    "service_unavailable_error", headers={"Retry-After": "5"})


async def _drain(handle) -> None:
    try:
        async for _ in handle:
            pass
    except LlmcError as exc:
        raise ApiError(500, f"generation failed: {exc}", "server_error") from None


async def _in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


# -- running it ----------------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or an LlmcError saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise LlmcError(f"cannot listen on {host}:{port}: {exc.strerror or exc}: pick another --host or --port") \
            from None
    sock.set_inheritable(True)
    return sock


def serve(path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 20.0,
          access_log: bool = False, **app_options) -> int:
    """Run the server until SIGTERM or SIGINT; 0 after a clean shutdown, 1 if the model failed to load."""
    try:
        import uvicorn
    except ImportError:
        raise LlmcError("llmc serve needs the serve extra: pip install 'llmc-compiler[serve]' "
                        "(or pip install -e '.[serve]' in a checkout)") from None
    if not Path(path).is_file():
        raise LlmcError(f"{path} does not exist or is not a file: give a .llmc artifact")
    app = App(path, **app_options)
    sock = listen(host, port)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    # Idle keep-alive connections stay open longer than clients' pools keep them (httpx 5 s,
    # aiohttp 15 s) and load balancers' idle timeouts (60 s): the client closes first, so it never
    # sends a request on a connection the server is closing at that moment.
    config = uvicorn.Config(app, log_level="warning", access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=int(shutdown_timeout) + 5, timeout_keep_alive=75)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):       # drain, then exit 0 (uvicorn's own re-raises the signal)
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
                return
            self.should_exit = True
            app.drain(shutdown_timeout)

    server = Server(config)
    app.on_failure = lambda: setattr(server, "should_exit", True)
    log(f"listening on http://{shown}:{bound[1]} (model {app.model_name!r}; loading {path})")
    server.run(sockets=[sock])
    if app.load_error is not None:
        error = app.load_error
        message = str(error) if isinstance(error, LlmcError) else f"{type(error).__name__}: {error}"
        raise LlmcError(f"the model failed to load: {message}")
    log("stopped")
    return 0
