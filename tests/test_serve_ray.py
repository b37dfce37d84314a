"""The Ray Serve example (examples/serve/ray_serve.py) with two local replicas: one OpenAI endpoint,
requests answered by both, each replica's answer the single-sequence generation's. Runs where
``ray[serve]`` is installed (it is not one of llmc's extras: CI skips this; see docs/serving.md)."""

import importlib.util
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import llmc

pytestmark = pytest.mark.slow
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def ray_app(chat_artifact):
    import ray

    spec = importlib.util.spec_from_file_location("ray_serve_example",
                                                  Path(__file__).parents[1] / "examples" / "serve" / "ray_serve.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example
    spec.loader.exec_module(example)
    ray.cloudpickle.register_pickle_by_value(example)    # the replicas cannot import it by name
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = 8000 + (hash(str(chat_artifact)) % 1000)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(example.deployment(str(chat_artifact), replicas=2, threads=1, model_name="tiny"), name="llmc",
              route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def test_two_replicas_behind_one_openai_endpoint(ray_app, chat_artifact):
    solo = llmc.load(chat_artifact, max_context=256)
    client = openai.OpenAI(base_url=ray_app + "/v1", api_key="none", max_retries=0)
    prompts = [f"prompt number {i}" for i in range(16)]

    def ask(prompt):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [solo.generate(p, max_new_tokens=20) for p in prompts]
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == solo.chat(
        [{"role": "user", "content": "hi"}], max_new_tokens=10)
    # Both replicas served: scraping /metrics reaches each (told apart by their start times), and
    # their generated tokens add up to what was asked for.
    assert httpx.get(ray_app + "/health").status_code == 200
    replicas = {}
    for _ in range(40):
        samples = dict(line.rsplit(" ", 1) for line in httpx.get(ray_app + "/metrics").text.splitlines()
                       if line and not line.startswith("#"))
        started = samples['llmc:server_start_time_seconds{model_name="tiny"}']
        replicas[started] = float(samples['vllm:generation_tokens_total{model_name="tiny"}'])
    assert len(replicas) == 2 and all(replicas.values())
    assert sum(replicas.values()) == 16 * 20 + 10
    bad = httpx.post(ray_app + "/v1/completions", json={"prompt": "x", "temperature": 9})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
