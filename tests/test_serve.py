"""``llmc serve`` as a user meets it: the real server in a subprocess on a free localhost port,
spoken to with the ``openai`` package (and raw httpx for what it hides: error bodies, headers,
disconnects). The oracle is the runtime's own single-sequence generation on the same artifact.

The tiny model's tests (the fast tier) cover the protocol; the ones on SmolLM2 (slow) cover what
needs time to happen: clients that leave mid-stream, a full queue, the request deadline, SIGTERM
with requests in flight.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import llmc

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

KEY = "sk-test-key"


class Server:
    """``llmc serve ARTIFACT --port 0 ...`` in a subprocess; the port it took is read from its log."""

    def __init__(self, artifact, *options: str, name: str = "tiny"):
        self.name = name
        command = [sys.executable, "-m", "llmc", "serve", str(artifact), "--port", "0", "--model-name", name, *options]
        env = {**os.environ, "LLMC_API_KEY": ""}
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.log: list[str] = []
        found = threading.Event()

        def read():
            for line in self.process.stderr:
                self.log.append(line)
                if "listening on" in line:
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(60) or self.process.poll() is not None:
            raise RuntimeError("the server did not start:\n" + "".join(self.log))
        self.url = re.search(r"listening on (http://\S+)", "".join(self.log)).group(1)
        deadline = time.monotonic() + 60
        while httpx.get(self.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "".join(self.log)
            time.sleep(0.05)

    def client(self, key: str | None = KEY, **options):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, **options)

    def post(self, path: str, body=None, key: str | None = KEY, **options):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60, **options)

    def metrics(self) -> dict[str, float]:
        """The /metrics samples: 'name{labels}' -> value."""
        text = httpx.get(self.url + "/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def sample(self, name: str, **labels) -> float:
        wanted = ",".join([f'model_name="{self.name}"'] + [f'{k}="{v}"' for k, v in labels.items()])
        return self.metrics().get(f"{name}{{{wanted}}}", 0.0)

    def wait_idle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.sample("vllm:num_requests_running") or self.sample("llmc:kv_blocks", state="used"):
            assert time.monotonic() < deadline, "requests still hold KV blocks"
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@pytest.fixture(scope="module")
def server(chat_artifact):
    server = Server(chat_artifact, "--api-key", KEY, "--max-body-bytes", "65536", "--max-context", "256")
    yield server
    assert server.stop() == 0, "".join(server.log)
    assert "Traceback" not in "".join(server.log), "".join(server.log)


@pytest.fixture(scope="module")
def solo(chat_artifact):
    return llmc.load(chat_artifact, max_context=256)


def chat(messages_text: str) -> list[dict]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": messages_text}]


def test_health_models_and_the_api_key(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert server.client().models.retrieve("tiny").id == "tiny"
    for key in (None, "sk-wrong"):
        with pytest.raises(openai.AuthenticationError):
            server.client(key).models.list()
        r = server.post("/v1/chat/completions", {"messages": chat("hi")}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/metrics").status_code == 200         # probes and scrapers need no key


def test_chat_and_completions_equal_solo_generation(server, solo):
    client = server.client()
    messages = chat("name three colours")
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
    want = solo.chat(messages, max_new_tokens=40)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    ids = solo.tokenizer.encode(solo.tokenizer.render_chat(messages))
    assert got.usage.prompt_tokens == len(ids)
    assert got.usage.completion_tokens == 40 and got.choices[0].finish_reason == "length"

    done = client.completions.create(model="tiny", prompt="The sky is", max_tokens=30, temperature=0)
    assert done.choices[0].text == solo.generate("The sky is", max_new_tokens=30)
    ids = client.completions.create(model="tiny", prompt=[10, 20, 30], max_tokens=12, temperature=0)
    assert ids.choices[0].text == solo.tokenizer.decode(solo.generate([10, 20, 30], max_new_tokens=12))
    # Several prompts in one request: choices in prompt order, usage summed.
    batch = client.completions.create(model="tiny", prompt=["The sky is", "Once"], max_tokens=8, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[1].text == solo.generate("Once", max_new_tokens=8)
    assert batch.usage.completion_tokens == 16
    echoed = client.completions.create(model="tiny", prompt="The sky is", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "The sky is" + solo.generate("The sky is", max_new_tokens=5)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=7)])
def test_streamed_equals_whole(server, sampling):
    client = server.client()
    messages = chat("tell me about the sea")
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=50, n=2, **sampling)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=50, n=2, stream=True,
                                            stream_options={"include_usage": True}, **sampling)
    texts, reasons, usage = {}, {}, None
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens

    whole = client.completions.create(model="tiny", prompt="A river", max_tokens=40, **sampling)
    pieces = client.completions.create(model="tiny", prompt="A river", max_tokens=40, stream=True, **sampling)
    assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text


def test_openai_penalties_equal_solo_generation(server, solo):
    r = server.client().completions.create(model="tiny", prompt="The sky is", max_tokens=40, temperature=0,
                                           frequency_penalty=0.7, presence_penalty=0.4)
    want = solo.generate("The sky is", max_new_tokens=40, frequency_penalty=0.7, presence_penalty=0.4)
    assert r.choices[0].text == want and want != solo.generate("The sky is", max_new_tokens=40)


def test_raw_stream_is_sse_ending_in_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "x", "max_tokens": 5, "stream": True, "temperature": 0}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_same_seed_same_output_whatever_the_concurrency(server):
    client = server.client()

    def ask(seed: int) -> str:
        r = client.chat.completions.create(model="tiny", messages=chat(f"story {seed % 3}"), max_tokens=30,
                                           temperature=1.0, seed=seed, extra_body={"top_k": 50})
        return r.choices[0].message.content

    seeds = list(range(12))
    alone = [ask(s) for s in seeds]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(ask, seeds))
    assert together == alone
    assert len(set(alone)) > 1                   # the seeds matter


def test_n_and_logprobs(server, solo):
    client = server.client()
    messages = chat("count")
    many = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=1.0, seed=3,
                                          n=3)
    one = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=1.0, seed=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == one.choices[0].message.content      # choice i draws from seed + i
    assert many.usage.prompt_tokens == one.usage.prompt_tokens

    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 10 and "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.token == t.top_logprobs[0].token and math.isclose(t.logprob, t.top_logprobs[0].logprob)  # greedy
        assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1 + 1e-6
        assert bytes(t.bytes).decode() == t.token

    legacy = client.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert "".join(lp.tokens) == legacy.choices[0].text and len(lp.token_logprobs) == 6
    assert lp.text_offset[0] == 0 and all(len(top) <= 2 for top in lp.top_logprobs)


def test_stop_strings(server, solo):
    client = server.client()
    free = solo.generate("The sky is", max_new_tokens=40)
    stop = free[10:13]
    cut = free[:free.index(stop)]
    r = client.completions.create(model="tiny", prompt="The sky is", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    pieces = client.completions.create(model="tiny", prompt="The sky is", max_tokens=40, temperature=0,
                                       stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == cut


def test_tools_reach_the_template_and_content_parts_are_joined(server):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    plain = server.post("/v1/chat/completions", {"messages": chat("hi"), "max_tokens": 1}).json()
    with_tools = server.post("/v1/chat/completions", {"messages": chat("hi"), "max_tokens": 1, "tools": tools}).json()
    shown = len(("<tools>" + json.dumps(tools) + "\n").encode())            # one token a byte
    assert with_tools["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + shown
    parts = [{"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
             {"role": "user", "content": "hi"}]
    joined = server.post("/v1/chat/completions", {"messages": parts, "max_tokens": 1}).json()
    assert joined["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert joined["usage"]["prompt_tokens_details"]["cached_tokens"] > 0       # the same prompt: its blocks are cached


def test_unknown_fields_are_ignored(server):
    r = server.post("/v1/chat/completions", {"messages": chat("hi"), "max_tokens": 3, "user": "u1",
                                             "some_future_field": {"x": 1}, "presence_penalty": 0,
                                             "parallel_tool_calls": True, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_tokenize_and_detokenize(server, solo):
    r = server.post("/tokenize", {"prompt": "héllo"}).json()
    assert r["tokens"] == solo.tokenizer.encode("héllo") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256
    assert server.post("/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "héllo"}
    r = server.post("/tokenize", {"messages": chat("hi")}).json()
    assert r["tokens"] == solo.tokenizer.encode(solo.tokenizer.render_chat(chat("hi")))
    assert server.post("/detokenize", {"tokens": [999]}).status_code == 400


CHAT_OK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

BAD = [  # path, body (or raw bytes), status, param or code it names
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"", 400, None),
    ("/v1/chat/completions", [1, 2], 400, None),
    ("/v1/chat/completions", {"max_tokens": 2}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT_OK, "temperature": 5}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT_OK, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT_OK, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {**CHAT_OK, "min_p": 1}, 400, "min_p"),
    ("/v1/chat/completions", {**CHAT_OK, "top_k": -2}, 400, "top_k"),
    ("/v1/chat/completions", {**CHAT_OK, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {**CHAT_OK, "n": 1000}, 400, "n"),
    ("/v1/chat/completions", {**CHAT_OK, "n": 1.5}, 400, "n"),
    ("/v1/chat/completions", {**CHAT_OK, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT_OK, "max_tokens": 10 ** 6}, 400, "context_length_exceeded"),
    ("/v1/chat/completions", {**CHAT_OK, "seed": -1}, 400, "seed"),
    ("/v1/chat/completions", {**CHAT_OK, "stop": ""}, 400, "stop"),
    ("/v1/chat/completions", {**CHAT_OK, "stop": [1]}, 400, "stop"),
    ("/v1/chat/completions", {**CHAT_OK, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {**CHAT_OK, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/chat/completions", {**CHAT_OK, "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT_OK, "logprobs": True, "top_logprobs": 99}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT_OK, "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ("/v1/chat/completions", {**CHAT_OK, "presence_penalty": "high"}, 400, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT_OK, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("/v1/chat/completions", {**CHAT_OK, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {**CHAT_OK, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {**CHAT_OK, "stop_token_ids": [1000]}, 400, None),
    ("/v1/chat/completions", {**CHAT_OK, "model": "gpt-4"}, 404, "model_not_found"),
    ("/v1/completions", {"max_tokens": 2}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5000]}, 400, None),
    ("/v1/completions", {"prompt": ""}, 400, None),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x" * 300}, 400, "context_length_exceeded"),
    ("/v1/embeddings", {"input": "x"}, 404, "not_found"),
    ("/v1/chat/completions", b"x" * 70000, 413, "request_too_large"),
]


@pytest.mark.parametrize("path,body,status,names", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, path, body, status, names):
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={"Authorization": f"Bearer {KEY}"})
    else:
        r = server.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in r.text
    if names is not None:
        assert names in (error["param"], error["code"]), error


def test_wrong_method_and_the_client_sees_errors_as_exceptions(server):
    r = httpx.get(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        server.client().chat.completions.create(model="tiny", messages=chat("x"), temperature=3)
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="other", messages=chat("x"))


def server_errors(server) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("llmc:http_responses_total") and 'code="5' in k)


def test_metrics_use_vllm_names_and_count(server):
    before = server.sample("vllm:generation_tokens_total")
    errors = server_errors(server)       # /health answers 503 while the model loads: not these requests' doing
    server.post("/v1/completions", {"prompt": "abc", "max_tokens": 7, "temperature": 0})
    text = httpx.get(server.url + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:prompt_tokens_total", "vllm:request_success_total"):
        assert f"# TYPE {name} " in text
    assert server.sample("vllm:generation_tokens_total") == before + 7
    buckets = [v for k, v in server.metrics().items() if k.startswith("vllm:time_to_first_token_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == server.sample("vllm:time_to_first_token_seconds_count")
    server.wait_idle()
    assert server.sample("vllm:kv_cache_usage_perc") == 0
    assert server_errors(server) == errors


def test_sigterm_on_an_idle_server_exits_zero(chat_artifact):
    server = Server(chat_artifact)
    began = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - began < 10 and "stopped" in "".join(server.log)


def test_a_missing_artifact_or_taken_port_is_one_line(tmp_path, server, chat_artifact):
    for args in ([str(tmp_path / "none.llmc")], [str(chat_artifact), "--port", server.url.rsplit(":", 1)[1]]):
        r = subprocess.run([sys.executable, "-m", "llmc", "serve", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr


def test_loading_and_draining_answer_503(chat_artifact):
    """The app before its model has loaded and while it drains (in-process, through ASGI)."""
    import asyncio

    from llmc.serve.http import App

    async def ask(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get("/health"),
                    await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}))

    app = App(chat_artifact, model_name="tiny")
    health, busy = asyncio.run(ask(app))
    assert health.status_code == 503 and health.json() == {"status": "loading"}
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["type"] == "service_unavailable_error"
    app.load()
    assert [r.status_code for r in asyncio.run(ask(app))] == [200, 200]
    app.drain(grace=0)
    health, busy = asyncio.run(ask(app))
    assert health.status_code == 503 and busy.status_code == 503 and "shutting down" in busy.json()["error"]["message"]
    app.close()


def test_the_server_never_imports_torch_or_the_compiler(chat_artifact):
    """What ``llmc serve`` imports, from the command line to an answered request."""
    code = f"""
import asyncio, sys, httpx
import llmc.cli
from llmc.serve.http import App
app = App({str(chat_artifact)!r}, model_name="tiny")
app.load()
async def ask():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        r = await client.post("/v1/chat/completions", json={{"messages": [{{"role": "user", "content": "hi"}}],
                                                            "max_tokens": 3, "stream": True}})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\\n\\n"), r.text
asyncio.run(ask())
app.close()
bad = [m for m in ("torch", "transformers", "llmc.compiler", "llmc.frontend", "llmc.passes") if m in sys.modules]
assert not bad, bad
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_corrupt_artifact_exits_1_with_one_error_line(tmp_path):
    bad = tmp_path / "bad.llmc"
    bad.write_bytes(b"not an artifact" * 100)
    r = subprocess.run([sys.executable, "-m", "llmc", "serve", str(bad), "--port", "0"], capture_output=True,
                       text=True, timeout=60)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error: the model failed to load") and "Traceback" not in r.stderr


# -- SmolLM2: what needs time to happen --------------------------------------------------------------

LONG = {"prompt": "Tell me a long story about a dragon.", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from llmc.compiler import compile_model

    path = tmp_path_factory.mktemp("serve-smollm2") / "smollm2.llmc"
    compile_model("smollm2", path, quant="gguf", progress=None)
    return path


@pytest.fixture(scope="module")
def busy(smollm2):
    """SmolLM2 with room for two running and two waiting requests, and a 6 s deadline."""
    server = Server(smollm2, "--max-running", "2", "--max-queued", "2", "--request-timeout", "6",
                    "--max-context", "4096", name="smollm2")
    yield server
    assert server.stop() == 0, "".join(server.log)


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def open_stream(server: Server, body: dict):
    """A streaming request whose first event has arrived: (its lines to come, its context manager,
    whose exit closes the connection). Dropping the lines iterator closes it too."""
    cm = httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60)
    response = cm.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    while not next(lines):
        pass
    return lines, cm


@pytest.mark.slow
def test_smollm2_readme_flow(busy, smollm2):
    """The README's example: the openai client, streaming a chat; the reply is generate's."""
    client = busy.client(key=None)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=40, temperature=0)
    stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=40, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == whole.choices[0].message.content
    assert whole.choices[0].message.content == llmc.load(smollm2, max_context=256).chat(messages, max_new_tokens=40)


@pytest.mark.slow
def test_smollm2_disconnect_mid_stream_frees_the_blocks_at_once(busy):
    aborted = busy.sample("vllm:request_success_total", finished_reason="abort")
    lines, cm = open_stream(busy, LONG)
    wait_for(lambda: busy.sample("vllm:num_requests_running") == 1)      # the gauges come after the step
    assert busy.sample("llmc:kv_blocks", state="used") > 0
    cm.__exit__(None, None, None)                        # the client leaves after one token of 2000
    busy.wait_idle(timeout=5)
    assert busy.sample("vllm:request_success_total", finished_reason="abort") == aborted + 1
    # A client waiting for a whole answer that gives up: the same.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(busy.url + "/v1/completions", json=LONG, timeout=1.5)
    busy.wait_idle(timeout=5)
    assert busy.sample("vllm:request_success_total", finished_reason="abort") == aborted + 2


@pytest.mark.slow
def test_smollm2_overload_gets_429_then_recovers(busy):
    streams = [open_stream(busy, LONG) for _ in range(2)]                       # running
    short = {"prompt": "Hi", "max_tokens": 5}
    waiting = [ThreadPoolExecutor(1).submit(busy.post, "/v1/completions", short) for _ in range(2)]
    wait_for(lambda: busy.sample("vllm:num_requests_waiting") == 2)
    r = busy.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
    for lines, cm in streams:                      # the running ones leave: the waiting ones start
        cm.__exit__(None, None, None)
    assert [f.result(timeout=30).status_code for f in waiting] == [200, 200]
    assert busy.post("/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200
    busy.wait_idle()


@pytest.mark.slow
def test_smollm2_request_timeout_streamed(busy):
    began = time.monotonic()
    with httpx.stream("POST", busy.url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
        events = [line for line in r.iter_lines() if line]
    assert 5 < time.monotonic() - began < 15
    assert json.loads(events[-2][6:])["error"]["code"] == "request_timeout" and events[-1] == "data: [DONE]"
    busy.wait_idle()


@pytest.mark.slow
def test_smollm2_sigterm_finishes_short_requests_and_aborts_long_ones(smollm2):
    server = Server(smollm2, "--shutdown-timeout", "3", name="smollm2")
    long_lines, long_cm = open_stream(server, LONG)
    short = ThreadPoolExecutor(1).submit(server.post, "/v1/completions", {"prompt": "Hi", "max_tokens": 30,
                                                                         "ignore_eos": True})
    wait_for(lambda: server.sample("vllm:num_requests_running") == 2)
    began = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    rest = [line for line in long_lines if line]
    long_cm.__exit__(None, None, None)
    assert short.result(timeout=30).status_code == 200                   # finished within the grace period
    assert json.loads(rest[-2][6:])["error"]["type"] == "service_unavailable_error" and rest[-1] == "data: [DONE]"
    assert server.process.wait(30) == 0
    assert 2.5 < time.monotonic() - began < 15
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")
    assert "Traceback" not in "".join(server.log)
