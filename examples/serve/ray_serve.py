"""N replicas of ``llmc serve`` behind one OpenAI endpoint, with Ray Serve.

Each replica is a Ray actor holding one loaded artifact and its own ``llmc.Engine`` (continuous
batching inside the replica); Ray Serve's HTTP proxy spreads requests over the replicas (its
power-of-two-choices router) and scales them. The interface is Ray Serve's ASGI ingress: the
replica hands Ray the very ASGI application ``llmc serve`` runs (``llmc.serve.http.App``), so the
routes, errors, streaming, /health and /metrics are the same as one server's. Nothing here is
a second implementation of the API.

    pip install 'ray[serve]' && pip install -e '.[serve]'
    python examples/serve/ray_serve.py smollm2.llmc --replicas 2 --threads 1
    # then, from anywhere that reaches port 8000:
    #   openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none").chat.completions.create(...)

The artifact's path must be readable on every node (a shared filesystem, or copy it first).
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64, health_check_period_s=5)
@serve.ingress()
class LlmcReplica:
    def __init__(self, artifact: str, model_name: str, threads: int | None, engine_options: dict):
        from llmc.serve.http import App

        self.llmc_app = App(artifact, model_name=model_name, engine_options=engine_options,
                       load_options={"threads": threads})
        self.llmc_app.load()                     # the replica is ready once its model is
        if self.llmc_app.load_error is not None:
            raise RuntimeError(f"the model failed to load: {self.llmc_app.load_error}")

    def __serve_build_asgi_app__(self):
        return self.llmc_app

    def check_health(self) -> None:         # Ray restarts a replica whose engine died
        if self.llmc_app.state != "ready":
            raise RuntimeError(f"the replica is {self.llmc_app.state}")


def deployment(artifact: str, *, replicas: int = 2, threads: int | None = None, model_name: str | None = None,
               **engine_options):
    """The application to ``serve.run``: ``replicas`` copies of the artifact's engine."""
    name = model_name or Path(artifact).name.removesuffix(".llmc")
    return LlmcReplica.options(num_replicas=replicas).bind(str(Path(artifact).resolve()), name, threads,
                                                           engine_options)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve an llmc artifact with Ray Serve replicas.")
    parser.add_argument("artifact")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="threads of each replica's step")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None)
    args = parser.parse_args()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(deployment(args.artifact, replicas=args.replicas, threads=args.threads, model_name=args.model_name),
              name="llmc", route_prefix="/")
    print(f"serving on http://127.0.0.1:{args.port}/v1 with {args.replicas} replicas; Ctrl-C stops", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    serve.shutdown()


if __name__ == "__main__":
    main()
