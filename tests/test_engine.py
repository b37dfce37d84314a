"""The serving engine against solo generation: continuous batching, chunked prefill, preemption
and prefix caching change when tokens are computed, never which tokens come out (on the cpu
target a sequence's logits are bitwise the same in any batch)."""

import asyncio
import json
import threading

import numpy as np
import pytest

from llmc.errors import LlmcError

import llmc

@pytest.fixture(scope="module")
def artifact(chat_artifact):
    return chat_artifact


@pytest.fixture(scope="module")
def solo(artifact):
    return llmc.load(artifact, max_context=128)


def solo_output(solo, prompt, max_tokens, stop=None, **sampling):
    out = solo.generate(prompt, max_new_tokens=max_tokens, stop=stop, **sampling)
    return out if isinstance(out, str) else list(out)


def random_request(rng, solo):
    """A random prompt (text or ids), max_tokens and sampling; a stop string or stop token taken
    from the request's own solo output half of the time, so that stops do happen."""
    words = ["alpha", "beta", "gamma", "delta", "é", "naïve", "über", "😀", "the", "of", "to"]
    as_text = rng.random() < 0.6
    length = int(rng.integers(1, 70))
    if as_text:
        prompt = " ".join(rng.choice(words, size=max(1, length // 5)).tolist())
    else:
        prompt = rng.integers(0, 256, size=length).tolist()
    sampling = {} if rng.random() < 0.5 else dict(temperature=float(rng.choice([0.7, 1.0, 1.3])), seed=int(rng.integers(1000)),
                                                  top_k=int(rng.choice([0, 5, 40])), top_p=float(rng.choice([1.0, 0.9])),
                                                  min_p=float(rng.choice([0.0, 0.05])),
                                                  repetition_penalty=float(rng.choice([1.0, 1.2])),
                                                  presence_penalty=float(rng.choice([0.0, 0.6])),
                                                  frequency_penalty=float(rng.choice([0.0, 0.4, -0.3])))
    max_tokens = int(rng.integers(1, 40))
    stops = {}
    if rng.random() < 0.5:
        free = solo_output(solo, prompt, max_tokens, **sampling)
        at = int(rng.integers(len(free)))
        if as_text and free:
            stops["stop"] = [free[at: at + int(rng.integers(1, 3))]]
        elif not as_text:
            stops["stop_token_ids"] = [free[at]]
    return prompt, max_tokens, stops, sampling


def solo_with_stops(solo, prompt, max_tokens, stops, sampling):
    """generate's output, cut at the first stop token (generate itself stops only at EOS)."""
    out = solo_output(solo, prompt, max_tokens, stops.get("stop"), **sampling)
    for token in stops.get("stop_token_ids", []):
        if token in out:
            out = out[:out.index(token)]
    return out


def engine_output(output, prompt):
    completion = output.completions[0]
    return completion.text if isinstance(prompt, str) else completion.token_ids


def test_outputs_equal_solo_generation_for_random_mixes(artifact, solo):
    """Random prompts (text and ids), lengths, max_tokens, stops, greedy and seeded sampling,
    arriving while others run, some aborted: each equals its solo generate (an aborted one, a
    prefix of it)."""
    rng = np.random.default_rng(1234)
    model = llmc.load(artifact, max_context=128)
    requests = [random_request(rng, solo) for _ in range(40)]
    # Some long requests are aborted after their first token (mid-stream: they ask for 80).
    aborted = [i for i, r in enumerate(requests) if isinstance(r[0], list) and len(r[0]) <= 40][:5]
    for i in aborted:
        requests[i] = (requests[i][0], 80, {}, requests[i][3])
    with llmc.Engine(model, kv_blocks=120, max_running=6, max_step_tokens=24) as engine:
        handles = []
        for i, (prompt, max_tokens, stops, sampling) in enumerate(requests):
            handles.append(engine.submit(prompt, max_tokens=max_tokens, **stops, **sampling))
            if i in aborted:
                next(iter(handles[-1]))
                handles[-1].abort()
            elif i % 5 == 4:                    # let the running ones go on for a while
                next(iter(handles[-1]), None)
        outputs = [h.result(timeout=120) for h in handles]
        assert engine.metrics()["kv_blocks_used"] == 0
    reasons = [out.completions[0].finish_reason for out in outputs]
    assert {"stop", "length", "abort"} <= set(reasons)
    for i, ((prompt, max_tokens, stops, sampling), out) in enumerate(zip(requests, outputs)):
        want = solo_with_stops(solo, prompt, max_tokens, stops, sampling)
        got = engine_output(out, prompt)
        if reasons[i] == "abort":
            assert i in aborted and want[:len(got)] == got, (i, got, want)
            continue
        assert got == want, (i, prompt, max_tokens, stops, sampling, got, want)
        assert reasons[i] == "length" if len(out.completions[0].token_ids) == max_tokens and not stops else True


def test_streamed_deltas_add_up_to_the_result(artifact):
    with llmc.Engine(artifact, max_context=128, kv_blocks=64) as engine:
        handle = engine.submit("gamma delta", max_tokens=20, temperature=1.0, seed=3)
        deltas = list(handle)
        out = handle.result()
    assert deltas[-1].finish_reason == out.completions[0].finish_reason and all(d.finish_reason is None for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == out.text
    assert [t for d in deltas for t in d.token_ids] == out.token_ids


def test_async_iteration_gives_the_same_deltas(artifact, solo):
    async def main(engine):
        handles = [engine.submit(p, max_tokens=12) for p in ("alpha", "beta beta", "naïve über")]

        async def collect(handle):
            return "".join([d.text async for d in handle])

        return await asyncio.gather(*(collect(h) for h in handles))

    with llmc.Engine(artifact, max_context=128, kv_blocks=64) as engine:
        texts = asyncio.run(main(engine))
    assert texts == [solo_output(solo, p, 12) for p in ("alpha", "beta beta", "naïve über")]


def test_a_tiny_pool_forces_preemption_and_outputs_stay_the_same(artifact, solo):
    """A pool of one sequence's blocks (32 of 4 tokens) for 6 requests that together need far
    more: sequences are preempted, recomputed, and still give their solo output (half of them
    greedy with the output penalties, which must count only generated tokens, recomputed or not)."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 256, size=int(rng.integers(20, 60))).tolist() for _ in range(6)]
    options = [dict(temperature=0.9, seed=i) if i % 2 else dict(frequency_penalty=0.8, presence_penalty=0.5)
               for i in range(6)]
    with llmc.Engine(artifact, max_context=128, kv_blocks=32, max_running=6, max_step_tokens=32) as engine:
        handles = [engine.submit(p, max_tokens=60, ignore_eos=True, **o) for p, o in zip(prompts, options)]
        outputs = [h.result(timeout=120) for h in handles]
        metrics = engine.metrics()
    assert metrics["preemptions"] > 0
    for prompt, out, o in zip(prompts, outputs, options):
        assert out.completions[0].finish_reason == "length"
        assert out.token_ids == solo_output(solo, prompt, 60, **o)


def test_prefix_cache_shares_full_blocks_and_gives_identical_logits(artifact):
    prompt = list(range(10, 51))                  # 41 tokens: 10 full blocks of 4, then one token
    with llmc.Engine(artifact, max_context=128, kv_blocks=64) as engine:
        first = engine.generate(prompt, max_tokens=6, logprobs=True, top_logprobs=5)
        before = engine.metrics()
        second = engine.generate(prompt, max_tokens=6, logprobs=True, top_logprobs=5)
        after = engine.metrics()
        # n completions of one prompt: the first computes it, the others share its blocks.
        many = engine.generate(prompt + [7, 7, 7, 7], max_tokens=4, n=3, temperature=1.0, seed=11)
        final = engine.metrics()
    assert first.cached_tokens == 0 and second.cached_tokens == 40
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == 40
    assert second.token_ids == first.token_ids
    assert second.completions[0].logprobs == first.completions[0].logprobs      # bitwise: same floats
    assert final["prefix_cache_hit_tokens"] - after["prefix_cache_hit_tokens"] == 40 + 2 * 44
    assert [c.index for c in many.completions] == [0, 1, 2]
    # Completion i is seeded with seed + i: the first is generate(seed=11), the others differ from it.
    assert len({tuple(c.token_ids) for c in many.completions}) > 1


def test_logprobs_are_the_model_distribution(artifact, solo):
    prompt = [5, 6, 7, 8, 9]
    with llmc.Engine(artifact, max_context=128, kv_blocks=64) as engine:
        out = engine.generate(prompt, max_tokens=3, logprobs=True, top_logprobs=3)
    logits = solo.logits(prompt + out.token_ids[:2]).astype(np.float64)
    for step, entry in enumerate(out.completions[0].logprobs):
        row = logits[len(prompt) - 1 + step]
        logp = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert entry.token_id == out.token_ids[step] == int(np.argmax(row))
        np.testing.assert_allclose(entry.logprob, logp[entry.token_id], rtol=1e-12)
        assert [t for t, _ in entry.top] == np.argsort(-logp, kind="stable")[:3].tolist()


def test_blocks_return_to_the_pool_after_1000_random_requests(artifact):
    rng = np.random.default_rng(9)
    with llmc.Engine(artifact, max_context=128, kv_blocks=48, max_running=16, max_step_tokens=32,
                     max_queued=2000) as engine:
        handles = []
        for i in range(1000):
            prompt = rng.integers(0, 256, size=int(rng.integers(1, 14))).tolist()
            if rng.random() < 0.3:
                prompt = [1, 2, 3, 4, 5, 6, 7, 8] + prompt       # a shared prefix of two blocks
            handles.append(engine.submit(prompt, max_tokens=int(rng.integers(1, 6)), n=int(rng.choice([1, 1, 2])),
                                         stop_token_ids=[int(rng.integers(0, 256))]))
            if rng.random() < 0.1:
                handles[int(rng.integers(len(handles)))].abort()
        reasons = [c.finish_reason for h in handles for c in h.result(timeout=300).completions]
        metrics = engine.metrics()
        engine.pool.check()
    assert metrics["kv_blocks_used"] == 0 and metrics["running"] == 0 and metrics["waiting"] == 0
    assert set(reasons) <= {"stop", "length", "abort"} and "length" in reasons
    assert metrics["prefix_cache_hit_tokens"] > 0
    assert sum(metrics["requests_finished"].values()) == len(reasons)


@pytest.mark.parametrize("bad, message", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt=[1, 2, 999]), r"in \[0, 256\)"),
    (dict(prompt=[1.5]), "list of ints"),
    (dict(prompt=list(range(128))), "no room"),
    (dict(prompt=[1, 2], max_tokens=127), "do not fit"),
    (dict(prompt=[1, 2], max_tokens=0), "max_tokens"),
    (dict(prompt=[1, 2], temperature=-1), "temperature"),
    (dict(prompt=[1, 2], temperature=float("inf")), "finite"),
    (dict(prompt=[1, 2], top_p=0), "top_p"),
    (dict(prompt=[1, 2], seed=-1), "seed"),
    (dict(prompt=[1, 2], n=0), "n must be"),
    (dict(prompt="hi", stop=5), "stop must be"),
    (dict(prompt="hi", stop=[""]), "must not be empty"),
    (dict(prompt="hi", stop=["a", 3]), "stop must be"),
    (dict(prompt=[1], top_logprobs=21), "top_logprobs"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), "role"),
    (dict(messages=[{"role": "user", "content": 5}]), "content"),
    (dict(prompt="hi", messages=[{"role": "user", "content": "x"}]), "either"),
])
def test_bad_requests_are_refused_at_submit(artifact, bad, message):
    with llmc.Engine(artifact, max_context=128, kv_blocks=64) as engine:
        running = engine.submit([1, 2, 3], max_tokens=30, ignore_eos=True)
        with pytest.raises(LlmcError, match=message):
            engine.submit(**bad)
        assert len(running.result(timeout=60).token_ids) == 30


def test_the_queue_is_bounded(artifact):
    with llmc.Engine(artifact, max_context=128, kv_blocks=64, max_running=1, max_queued=2) as engine:
        first = engine.submit([1, 2, 3], max_tokens=100, ignore_eos=True)
        next(iter(first))                           # running: it no longer waits
        waiting = [engine.submit([4], max_tokens=2), engine.submit([5], max_tokens=2)]
        with pytest.raises(llmc.QueueFullError, match="queue is full"):
            engine.submit([6], max_tokens=2)
        first.abort()
        assert first.result().completions[0].finish_reason == "abort"
        assert all(h.result(timeout=60).completions[0].finish_reason in ("stop", "length") for h in waiting)
    with pytest.raises(llmc.EngineClosedError):
        engine.submit([1])


def test_chat_turns_reuse_the_conversation_blocks(artifact):
    with llmc.Engine(artifact, max_context=256, kv_blocks=128) as engine:
        messages = [{"role": "user", "content": "tell me about alpha and beta"}]
        reply = engine.generate(messages=messages, max_tokens=10)
        messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "and gamma?"}]
        second = engine.generate(messages=messages, max_tokens=10)
    first_prompt = len(reply.prompt_token_ids)
    assert second.cached_tokens >= first_prompt // 4 * 4


def test_the_model_refuses_single_sequence_calls_while_an_engine_drives_it(artifact):
    model = llmc.load(artifact, max_context=64)
    engine = llmc.Engine(model, kv_blocks=40)
    with pytest.raises(LlmcError, match="driven by an Engine"):
        model.generate([1, 2], max_new_tokens=2)
    with pytest.raises(LlmcError, match="another Engine"):
        llmc.Engine(model)
    engine.close()
    assert len(model.generate([1, 2], max_new_tokens=2)) == 2


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(artifact, solo, monkeypatch):
    model = llmc.load(artifact, max_context=128)
    with llmc.Engine(model, kv_blocks=64) as engine:
        real = model.run_batch
        monkeypatch.setattr(model, "run_batch", lambda batch: (_ for _ in ()).throw(RuntimeError("device lost")))
        doomed = engine.submit([1, 2, 3], max_tokens=4)
        with pytest.raises(LlmcError, match="device lost"):
            doomed.result(timeout=30)
        monkeypatch.setattr(model, "run_batch", real)
        assert engine.generate([1, 2, 3], max_tokens=4).token_ids == solo_output(solo, [1, 2, 3], 4)
        assert engine.metrics()["kv_blocks_used"] == 0


def test_metrics_count_tokens_and_latencies(artifact):
    with llmc.Engine(artifact, max_context=128, kv_blocks=64) as engine:
        outs = [engine.submit([1 + i, 2, 3], max_tokens=5, ignore_eos=True) for i in range(4)]
        for h in outs:
            h.result(timeout=60)
        m = engine.metrics()
    assert m["prompt_tokens"] == 12 and m["generation_tokens"] == 20
    assert m["time_to_first_token_seconds"]["count"] == 4 and m["inter_token_latency_seconds"]["count"] == 16
    assert m["e2e_request_latency_seconds"]["count"] == 4 and m["requests_finished"] == {"length": 4}
    assert m["steps"] >= 5 and m["step_tokens"] == 12 + 4 * 4 and m["step_seconds"] > 0
    assert m["time_to_first_token_seconds"]["buckets"][-1] == (float("inf"), 4)
    json.dumps(m)                                  # plain data, for an exporter


def test_submission_is_thread_safe(artifact, solo):
    prompts = [[i, i + 1, i + 2] for i in range(1, 25)]
    results = {}
    with llmc.Engine(artifact, max_context=128, kv_blocks=96, max_running=8) as engine:
        def client(chunk):
            for p in chunk:
                results[tuple(p)] = engine.generate(p, max_tokens=8).token_ids

        threads = [threading.Thread(target=client, args=(prompts[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        seen = []
        while any(t.is_alive() for t in threads):       # read the gauges while the loop runs
            m = engine.metrics()
            seen.append(m["running"])
            assert 0 <= m["kv_blocks_used"] <= m["kv_blocks"] and m["running"] <= 8
        for t in threads:
            t.join(timeout=120)
    assert all(results[tuple(p)] == solo_output(solo, p, 8) for p in prompts)
    assert max(seen) > 1


def test_limits_are_checked(artifact):
    model = llmc.load(artifact, max_context=64)
    with pytest.raises(LlmcError, match="max_running must be an int from 1 to max_step_tokens"):
        llmc.Engine(model, max_running=17, max_step_tokens=16)
    for bad in (dict(max_step_tokens=0), dict(max_step_tokens=33), dict(max_queued=-1), dict(kv_blocks=3),
                dict(kv_blocks=40, kv_bytes=1 << 20), dict(max_running=1.5)):
        with pytest.raises(LlmcError):
            llmc.Engine(model, **bad)
    with llmc.Engine(model, max_step_tokens=8) as engine:       # max_running follows a small budget
        assert engine.scheduler.max_running == 8


def test_a_fault_of_the_engine_fails_its_requests_instead_of_hanging(artifact, solo, monkeypatch):
    with llmc.Engine(artifact, max_context=128, kv_blocks=64) as engine:
        monkeypatch.setattr(engine.scheduler, "schedule", lambda: 1 / 0)     # this scheduler breaks
        doomed = engine.submit([1, 2, 3], max_tokens=4)
        with pytest.raises(LlmcError, match="engine failed"):
            doomed.result(timeout=30)
        # The loop starts over with a fresh scheduler and pool and serves the next request.
        assert engine.generate([1, 2, 3], max_tokens=4).token_ids == solo_output(solo, [1, 2, 3], 4)


def test_the_engine_never_imports_torch_or_the_compiler(artifact):
    import subprocess
    import sys

    code = (f"import sys, llmc; e = llmc.Engine({str(artifact)!r}, max_context=64, kv_blocks=32); "
            "e.generate('alpha', max_tokens=3); e.close(); "
            "bad = [m for m in ('torch', 'transformers', 'llmc.compiler', 'llmc.frontend', 'llmc.passes') "
            "if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_bench_concurrency_prints_load_figures(artifact):
    import subprocess
    import sys

    def llmc_cli(*args):
        return subprocess.run([sys.executable, "-m", "llmc", "bench", str(artifact), *args], capture_output=True,
                              text=True, timeout=300)

    run = llmc_cli("--concurrency", "3", "--requests", "7", "--prompt-tokens", "12,30", "--decode-tokens", "9", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["requests"] == 7 and result["concurrency"] == 3
    assert result["generated_tok_s"] > 0 and 0 < result["ttft_p50_s"] <= result["ttft_p99_s"]
    assert result["tpot_p50_s"] > 0 and result["preemptions"] == 0
    text = llmc_cli("--concurrency", "2", "--prompt-tokens", "12", "--decode-tokens", "4")
    assert text.returncode == 0 and "8 requests, 2 at a time" in text.stdout and "first token" in text.stdout
    bad = llmc_cli("--concurrency", "0")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: --concurrency and --requests must be positive"]


def test_a_request_arriving_during_a_long_prefill_starts_at_the_next_step():
    """The scheduler alone (no model): a 200-token prompt prefills in chunks of a 32-token budget;
    a 5-token prompt that arrives meanwhile runs whole in the next step, beside the long prompt's
    chunk, and the budget is always used in full."""
    from llmc.serve.blocks import BlockPool
    from llmc.serve.scheduler import Scheduler, Sequence

    scheduler = Scheduler(BlockPool(80, 4), max_running=4, max_step_tokens=32, table_width=64)
    long = Sequence(list(range(200)), 200)
    scheduler.add(long)
    first = scheduler.schedule()
    assert first.chunks == [(long, 32)] and first.sampled == []
    scheduler.complete(first)
    short = Sequence([7, 8, 9, 10, 11], 5)
    scheduler.add(short)
    second = scheduler.schedule()
    assert dict(second.chunks) == {long: 27, short: 5} and second.sampled == [short]
    scheduler.complete(second)
    short.tokens.append(1)                          # its first output token, to decode next
    third = scheduler.schedule()
    assert dict(third.chunks) == {short: 1, long: 31}
