"""Counters and histograms the engine keeps and a server exports (Prometheus' cumulative buckets)."""

from __future__ import annotations

import bisect
from typing import Sequence

# vLLM's buckets, so that dashboards built for it read ours.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)     # the last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict:
        """``buckets``: (upper bound, observations at most it), cumulative, ending with +inf."""
        cumulative, total = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            cumulative.append((bound, total))
        return {"buckets": cumulative, "sum": self.sum, "count": self.count}


def _labels(**labels) -> str:
    def escape(value: str) -> str:
        return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


def prometheus(snapshot: dict | None, model_name: str, responses: dict[int, int], ready: bool,
               started: float) -> str:
    """The engine's ``metrics()`` snapshot (None while loading) as Prometheus text, under vLLM's
    metric names (so that dashboards, autoscalers and routers built for vLLM read it) plus
    llmc's own."""
    lines: list[str] = []
    model = _labels(model_name=model_name)

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    def histogram(name: str, help_: str, snap: dict) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} histogram")
        for bound, count in snap["buckets"]:
            lines.append(f"{name}_bucket{_labels(model_name=model_name, le=_number(bound))} {count}")
        lines.append(f"{name}_sum{model} {_number(snap['sum'])}")
        lines.append(f"{name}_count{model} {snap['count']}")

    metric("llmc:ready", "gauge", "1 once the model is loaded and the server takes requests.",
           [(model, 1.0 if ready else 0.0)])
    metric("llmc:server_start_time_seconds", "gauge", "When this server started (Unix time): tells replicas apart.",
           [(model, started)])
    metric("llmc:http_responses_total", "counter", "HTTP answers by status code.",
           [(_labels(model_name=model_name, code=code), n) for code, n in sorted(responses.items())])
    if snapshot is None:
        return "\n".join(lines) + "\n"
    s = snapshot
    metric("vllm:num_requests_running", "gauge", "Requests with sequences in the running batch.",
           [(model, s["running"])])
    metric("vllm:num_requests_waiting", "gauge", "Requests waiting to start (or preempted).",
           [(model, s["waiting"])])
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        metric(name, "gauge", "Share of KV-cache blocks held by sequences (1 = all); the second name is vLLM's "
                              "older one.", [(model, s["kv_usage"])])
    metric("vllm:num_preemptions_total", "counter", "Sequences preempted (recomputed later).",
           [(model, s["preemptions"])])
    metric("vllm:prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
           [(model, s["prompt_tokens"])])
    metric("vllm:generation_tokens_total", "counter", "Generated tokens.", [(model, s["generation_tokens"])])
    metric("vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
           [(model, s["prefix_cache_query_tokens"])])
    metric("vllm:prefix_cache_hits_total", "counter", "Prompt tokens the prefix cache supplied.",
           [(model, s["prefix_cache_hit_tokens"])])
    metric("vllm:request_success_total", "counter", "Finished sequences by why they ended.",
           [(_labels(model_name=model_name, finished_reason=reason), n)
            for reason, n in sorted(s["requests_finished"].items())])
    histogram("vllm:time_to_first_token_seconds", "Time from arrival to the first token.",
              s["time_to_first_token_seconds"])
    for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        histogram(name, "Time between two tokens of a sequence (the second name is vLLM's older one).",
                  s["inter_token_latency_seconds"])
    histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last token.",
              s["e2e_request_latency_seconds"])
    metric("llmc:kv_blocks", "gauge", "KV-pool blocks: all, held by sequences, free to take, cached for prefixes.",
           [(_labels(model_name=model_name, state=state), s[key]) for state, key in
            (("total", "kv_blocks"), ("used", "kv_blocks_used"), ("free", "kv_blocks_free"),
             ("cached", "kv_blocks_cached"))])
    metric("llmc:engine_steps_total", "counter", "Steps the engine ran.", [(model, s["steps"])])
    metric("llmc:engine_step_tokens_total", "counter", "Tokens computed in steps.", [(model, s["step_tokens"])])
    metric("llmc:engine_step_seconds_total", "counter", "Seconds spent inside the model's step.",
           [(model, s["step_seconds"])])
    return "\n".join(lines) + "\n"
