"""``llmc serve`` under load, against llama-cpp-python's own OpenAI server, and a soak run.

    python benchmarks/serve.py ARTIFACT load [--concurrency 1,4,16,64] [--rounds 2] [--requests-per-client 2]
                                             [--min-requests 16] [--no-llama-cpp]
    python benchmarks/serve.py ARTIFACT soak [--requests 3000] [--clients 16]

load: streaming clients (``--concurrency`` of them at once, each sending its next request when
the last one ends) against ``llmc serve ARTIFACT`` and ``python -m llama_cpp.server`` on SmolLM2's
Q4_1 GGUF requantized to Q4_0 (the fair peer of q4g32), both with 2 threads, both started once
and measured one at a time: at each level, ``--rounds`` rounds, the two servers one after the
other in each, the order reversed every round, fresh prompts every round; the ratio reported is
the median of the per-round ratios. The same requests for both: /v1/completions
with text prompts of about 16-512 tokens (random words, fixed seed) and 16-128 generated tokens
(end of sequence suppressed: ``ignore_eos`` for llmc, a logit bias for llama.cpp, so both produce
exactly max_tokens). llama-cpp-python's server runs with ``--interrupt_requests False``: by
default a new request cuts the running stream. Reports requests/s, generated tok/s, TTFT and
TPOT (time per output token after the first) p50/p99, and failed requests (any status but 200,
or a stream that did not end with ``finish_reason: length`` and ``[DONE]``).

soak: ``llmc serve`` with a small queue (--max-queued 16) and random traffic from ``--clients``
clients: short requests streamed or not, clients that leave mid-stream or mid-request, malformed
and oversized requests, and every 100 requests a burst of 48 at once (over the queue: 429s
expected). At the end: the statuses seen, the server's KV blocks in use (0 expected), 5xx answers
(none expected), and the server's resident memory sampled along the run.

Not a test: the machine is shared and noisy. Needs httpx and, for the peer, llama-cpp-python[server].
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
THREADS = 2
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or had "
         "river mountain compiler kernel token cache scheduler garden music history planet ocean winter").split()


def start(command: list[str], ready: str, probe: str = "/health") -> tuple[subprocess.Popen, str, list[str]]:
    """A server process; its URL once its log says ``ready`` (a regex whose group 1 is the URL)
    and ``probe`` answers 200."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "LLMC_API_KEY": ""})
    log: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read():
        for line in process.stderr:
            log.append(line)
            match = re.search(ready, line)
            if match and not url:
                url.append(match.group(1))
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(120) or not url:
        process.kill()
        sys.exit("the server did not start:\n" + "".join(log[-20:]))
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url[0] + probe, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            sys.exit("the server never became healthy:\n" + "".join(log[-20:]))
        time.sleep(0.1)
    return process, url[0], log


def llmc_server(artifact: str, *options: str) -> tuple[subprocess.Popen, str, list[str]]:
    return start([sys.executable, "-m", "llmc", "serve", artifact, "--port", "0", "--threads", str(THREADS),
                  "--model-name", "smollm2", *options], r"listening on (http://\S+)")


def llama_cpp_server(gguf: Path, port: int) -> tuple[subprocess.Popen, str, list[str]]:
    return start([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
                  "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS), "--n_ctx", "2048",
                  "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)],
                 r"Uvicorn running on (http://[\d.]+:\d+)", probe="/v1/models")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 400))), rng.randint(16, 128))
            for _ in range(n)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def one_stream(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed request: when its first text came, when it ended, whether it ended well."""
    began = time.perf_counter()
    first = None
    finish = None
    done = False
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"ok": False, "status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"ok": False, "status": "stream error"}
            for choice in chunk.get("choices", []):
                if choice.get("text") and first is None:
                    first = time.perf_counter()
                finish = choice.get("finish_reason") or finish
    end = time.perf_counter()
    ok = done and finish == "length" and first is not None
    return {"ok": ok, "status": 200 if ok else f"incomplete ({finish})", "ttft": (first or end) - began,
            "e2e": end - began, "tokens": body["max_tokens"]}


async def load_level(url: str, requests: list[tuple[str, int]], concurrency: int, peer: str, eos: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        async def worker():
            while not queue.empty():
                prompt, tokens = queue.get_nowait()
                body = {"model": "smollm2", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
                if peer == "llmc":
                    body["ignore_eos"] = True
                else:
                    body["logit_bias"] = {str(eos): -100.0}
                try:
                    results.append(await one_stream(client, url, body))
                except httpx.HTTPError as exc:
                    results.append({"ok": False, "status": type(exc).__name__})

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - began
    good = [r for r in results if r["ok"]]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in good if r["tokens"] > 1]
    ttft = [r["ttft"] for r in good]
    return {
        "requests": len(results), "failed": len(results) - len(good),
        "failures": sorted({str(r["status"]) for r in results if not r["ok"]}),
        "seconds": round(seconds, 2), "requests_per_s": round(len(good) / seconds, 3),
        "generated_tok_s": round(sum(r["tokens"] for r in good) / seconds, 1),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_ms": None if not tpot else percentile(tpot, 50) * 1e3,
        "tpot_p99_ms": None if not tpot else percentile(tpot, 99) * 1e3,
    }


def load(args) -> dict:
    from engine import q4_0_gguf

    levels = [int(x) for x in args.concurrency.split(",")]
    deepest = max(levels)
    # KV blocks for every client's longest sequence at once (16-token blocks, about 600 tokens each):
    # the run measures batching, not preemption.
    servers = {"llmc": llmc_server(args.artifact, "--max-context", "1024", "--kv-blocks", str(max(64, deepest * 40)),
                                   "--max-queued", "1024")}
    folder = Path(tempfile.mkdtemp(prefix="llmc-serve-bench-"))
    eos = 0
    if not args.no_llama_cpp:
        from llama_cpp import Llama

        gguf = q4_0_gguf(folder)
        eos = Llama(str(gguf), vocab_only=True, verbose=False).token_eos()
        servers["llama-cpp-python server"] = llama_cpp_server(gguf, free_port())
    report: dict = {"levels": {}}
    try:
        for concurrency in levels:
            rounds = []
            for r in range(args.rounds):
                # New prompts each round (the prefix cache must not help round 2); the same for both
                # servers within a round, which run one after the other, the order reversed each round.
                requests = workload(max(args.min_requests, args.requests_per_client * concurrency),
                                    seed=concurrency * 1000 + r)
                names = list(servers) if r % 2 == 0 else list(reversed(servers))
                row = {}
                for name in names:
                    peer = "llmc" if name == "llmc" else "llama.cpp"
                    row[name] = asyncio.run(load_level(servers[name][1], requests, concurrency, peer, eos))
                    print(f"concurrency {concurrency:3d} round {r + 1}  {name:26s} {json.dumps(row[name])}",
                          file=sys.stderr, flush=True)
                rounds.append(row)
            level: dict = {"rounds": rounds}
            if len(servers) == 2:
                ratios = [row["llmc"]["generated_tok_s"] / row["llama-cpp-python server"]["generated_tok_s"]
                          for row in rounds]
                level["llmc / llama.cpp generated tok/s, per round"] = [round(x, 2) for x in ratios]
                level["llmc / llama.cpp generated tok/s, median"] = round(statistics.median(ratios), 2)
            report["levels"][concurrency] = level
    finally:
        for process, _, _ in servers.values():
            process.terminate()
            process.wait(60)
    return report


# -- soak --------------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


BAD_BODIES = [
    b"{not json", b"[]", b'{"prompt": 5}', b'{"prompt": "x", "temperature": -1}', b'{"prompt": "x", "n": 0}',
    b'{"prompt": "x", "max_tokens": 100000000}', b'{"prompt": [999999]}', b'{"prompt": "x", "stop": [""]}',
    b'{"prompt": "x", "model": "nope"}', b'{"prompt": "x", "logprobs": 50}',
]


async def soak_client(client: httpx.AsyncClient, url: str, rng: random.Random, count: int, tally: dict) -> None:
    for _ in range(count):
        kind = rng.choices(["ok", "ok-stream", "leave-stream", "leave-whole", "bad", "huge", "route"],
                           [30, 30, 12, 6, 14, 4, 4])[0]
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60)))
        body = {"prompt": prompt, "max_tokens": rng.randint(1, 16), "temperature": rng.choice([0, 0.8])}
        try:
            if kind == "ok":
                status = (await client.post(url + "/v1/completions", json=body)).status_code
            elif kind == "ok-stream":
                async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
                    lines = [line async for line in r.aiter_lines() if line]
                    status = r.status_code if r.status_code != 200 or lines[-1] == "data: [DONE]" else "incomplete"
            elif kind == "leave-stream":
                long = {**body, "max_tokens": 200, "ignore_eos": True, "stream": True}
                async with client.stream("POST", url + "/v1/completions", json=long) as r:
                    status = r.status_code
                    async for line in r.aiter_lines():
                        if line and rng.random() < 0.3:
                            break                        # leaves: the context manager closes the connection
                status = f"{status} (left)"
            elif kind == "leave-whole":
                try:
                    await client.post(url + "/v1/completions", json={**body, "max_tokens": 200, "ignore_eos": True},
                                      timeout=rng.uniform(0.05, 1.0))
                    status = "200 (stayed)"
                except httpx.TimeoutException:
                    status = "left"
            elif kind == "bad":
                r = await client.post(url + "/v1/completions", content=rng.choice(BAD_BODIES),
                                      headers={"content-type": "application/json"})
                status = r.status_code
            elif kind == "huge":
                r = await client.post(url + "/v1/completions", content=b'{"prompt": "' + b"x" * (5 << 20) + b'"}')
                status = r.status_code
            else:
                status = (await client.get(url + "/v1/" + rng.choice(["nothing", "engines", "files"]))).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        tally[str(status)] = tally.get(str(status), 0) + 1


async def soak_run(url: str, pid: int, total: int, clients: int, seed: int) -> dict:
    tally: dict = {}
    memory: list[tuple[float, float]] = []
    began = time.perf_counter()
    stop = asyncio.Event()

    async def sample_memory():
        while not stop.is_set():
            memory.append((round(time.perf_counter() - began, 1), round(rss_mib(pid), 1)))
            try:
                await asyncio.wait_for(stop.wait(), 2.0)
            except asyncio.TimeoutError:
                pass

    limits = httpx.Limits(max_connections=200, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120), limits=limits) as client:
        sampler = asyncio.ensure_future(sample_memory())
        done = 0
        burst = 0
        while done < total:
            round_size = min(100, total - done)
            rngs = [random.Random(seed * 100003 + done + i) for i in range(clients)]
            share = [round_size // clients + (i < round_size % clients) for i in range(clients)]
            await asyncio.gather(*(soak_client(client, url, rng, n, tally) for rng, n in zip(rngs, share)))
            done += round_size
            # A burst over the queue limit: 48 requests at once.
            bodies = [{"prompt": "burst " * 8, "max_tokens": 8} for _ in range(48)]
            answers = await asyncio.gather(*(client.post(url + "/v1/completions", json=b) for b in bodies),
                                           return_exceptions=True)
            for a in answers:
                key = f"burst {a.status_code}" if isinstance(a, httpx.Response) else f"burst {type(a).__name__}"
                tally[key] = tally.get(key, 0) + 1
            burst += 48
            print(f"{done + burst} requests, {tally}", file=sys.stderr, flush=True)
        stop.set()
        await sampler
    return {"requests": sum(tally.values()), "seconds": round(time.perf_counter() - began, 1), "statuses": tally,
            "rss_mib": memory}


def soak(args) -> dict:
    # A small pool (2048 positions; 16 running sequences need more, so some are preempted), all of
    # whose pages the warm-up touches: memory that grows after it is a leak, not the pool filling in.
    process, url, log = llmc_server(args.artifact, "--max-queued", "16", "--max-running", "16", "--max-context", "512",
                                    "--kv-blocks", "128")
    try:
        # Warm up (first requests allocate the pool's pages and the executor's buffers), then measure.
        asyncio.run(soak_run(url, process.pid, 100, args.clients, seed=0))
        result = asyncio.run(soak_run(url, process.pid, args.requests, args.clients, seed=1))
        time.sleep(1)
        metrics = httpx.get(url + "/metrics").text
        samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                   for line in metrics.splitlines() if line and not line.startswith("#")}
        result["kv_blocks_used_after"] = samples['llmc:kv_blocks{model_name="smollm2",state="used"}']
        result["running_after"] = samples['vllm:num_requests_running{model_name="smollm2"}']
        result["server_5xx"] = {k: v for k, v in samples.items() if k.startswith("llmc:http_responses_total")
                                and 'code="5' in k}
        result["server_aborted_sequences"] = samples.get(
            'vllm:request_success_total{model_name="smollm2",finished_reason="abort"}', 0)
        rss = [m for _, m in result["rss_mib"]]
        result["rss_mib_first_last_max"] = [rss[0], rss[-1], max(rss)]
        result["rss_mib"] = result["rss_mib"][:: max(1, len(result["rss_mib"]) // 20)]
        result["tracebacks_in_server_log"] = sum("Traceback" in line for line in log)
    finally:
        process.terminate()
        result["exit_code"] = process.wait(60)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("what", choices=["load", "soak"])
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="load: rounds per level, the order reversed each")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    result = load(args) if args.what == "load" else soak(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
