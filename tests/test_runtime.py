"""compile -> .llmc -> llmc.load -> generate, on the reference target, against transformers."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import relative_error, tiny_model
from llmc.artifact import ArtifactError
from llmc.compiler import compile_model
from llmc.errors import LlmcError

import llmc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_model("qwen2")
    path = tmp_path_factory.mktemp("artifacts") / "tiny.llmc"
    compile_model(model, path, kv="f32", progress=None)       # f32 throughout: transformers' own numbers
    return model, path


def greedy_reference(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_generation_matches_transformers(tiny):
    model, path = tiny
    loaded = llmc.load(path, max_context=96)
    ids = [5, 77, 3, 101, 64, 9, 12]
    assert loaded.generate(ids, max_new_tokens=64) == greedy_reference(model, ids, 64)
    streamed = [piece for piece in loaded.generate(ids, max_new_tokens=64, stream=True)]
    assert [t for piece in streamed for t in piece] == greedy_reference(model, ids, 64)
    assert loaded.tokenizer is None


def test_logits_for_every_position(tiny):
    model, path = tiny
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    got = llmc.load(path).logits(ids)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert got.shape == (11, 128) and got.dtype == np.float32
    assert relative_error(got, want) < 1e-4


def test_the_default_kv_cache_is_f16_within_rounding_of_f32(tiny, tmp_path):
    model, exact = tiny
    path = tmp_path / "default.llmc"
    report = compile_model(model, path, progress=None)
    assert (report.kv, report.quant) == ("f16", "f32") and set(report.defaults) == {"kv", "quant"}
    default, f32 = llmc.load(path), llmc.load(exact)
    assert default.manifest["kv_pool"]["dtype"] == "f16"
    assert default.bytes_per_position * 2 == f32.bytes_per_position
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    got, want = default.logits(ids), f32.logits(ids)
    assert 0 < relative_error(got, want) < 1e-3          # K and V rounded to f16 (11 bits), nothing else


def test_sampling_is_seeded(tiny):
    _, path = tiny
    loaded = llmc.load(path)
    a = loaded.generate([1, 2, 3], max_new_tokens=20, temperature=0.9, top_p=0.9, seed=11)
    b = loaded.generate([1, 2, 3], max_new_tokens=20, temperature=0.9, top_p=0.9, seed=11)
    assert a == b


def test_user_errors(tiny, tmp_path):
    _, path = tiny
    loaded = llmc.load(path, max_context=16)
    with pytest.raises(LlmcError, match="do not fit the KV cache of 16"):
        loaded.generate(list(range(10)), max_new_tokens=10)
    with pytest.raises(LlmcError, match="no tokenizer"):
        loaded.generate("hello")
    with pytest.raises(LlmcError, match=r"token ids must be in \[0, 128\)"):
        loaded.generate([500])
    with pytest.raises(LlmcError, match="max_context must be between 1"):
        llmc.load(path, max_context=10**6)
    broken = tmp_path / "broken.llmc"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    broken.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        llmc.load(broken)


def test_load_and_generate_never_import_torch(tiny):
    _, path = tiny
    code = (f"import sys, llmc; m = llmc.load({str(path)!r}); m.generate([1, 2], max_new_tokens=3); "
            "bad = [k for k in ('torch', 'transformers') if k in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bench_reports_speed_bandwidth_and_its_share(tiny):
    import json

    from llmc.artifact import read_artifact
    from llmc.runtime.bench import bench, bytes_per_decode_token

    _, path = tiny
    model = llmc.load(path, max_context=64)
    result = bench(model, prompt_lengths=(7, 33), decode_tokens=8, runs=1, bandwidth_gbs=10.0)
    assert set(result["prefill"]) == {"7", "33"} and all(r["tokens_per_s"] > 0 for r in result["prefill"].values())
    d = result["decode"]
    assert d["tokens"] == 8 and d["tokens_per_s"] > 0
    assert d["achieved_gbs"] == pytest.approx(d["bytes_per_token"] * d["tokens_per_s"] / 1e9)
    assert d["fraction_of_bandwidth"] == pytest.approx(d["achieved_gbs"] / 10.0)
    # Qwen2's embedding is not tied: the table costs one row per token, the LM head all of it.
    weights = read_artifact(path).weights()
    embed = weights["model.embed_tokens.weight"]
    others = sum(a.nbytes for name, a in weights.items() if name != "model.embed_tokens.weight")
    cache = 2 * 2 * 2 * 16 * 4 * 12               # k and v, 2 layers, 2 kv heads, head_dim 16, f32, position 12
    assert bytes_per_decode_token(model, 12) == others + embed[0].nbytes + cache

    cli = subprocess.run([sys.executable, "-m", "llmc", "bench", str(path), "--json", "--runs", "1",
                          "--prompt-tokens", "5", "--decode-tokens", "4", "--profile"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    printed = json.loads(cli.stdout)
    assert printed["decode"]["tokens"] == 4
    # --profile: each phase's steps and ms per op kind (decode: four steps of one token)
    assert set(printed["profile"]) == {"prefill 5", "decode"}
    decode = printed["profile"]["decode"]
    assert decode["summary"]["steps"] == 4 and decode["summary"]["kinds"]["attention"] >= 0
    assert "profile of decode: 4 steps" in decode["table"]


def test_generation_stops_at_an_end_of_sequence_token(tiny):
    _, path = tiny
    model = llmc.load(path)
    ids = [5, 77, 3]
    tokens = model.generate(ids, max_new_tokens=10)
    model.manifest["eos_token_ids"] = [tokens[3]]
    assert model.generate(ids, max_new_tokens=10) == tokens[:tokens.index(tokens[3])]


BAD_CALLS = [
    (dict(prompt="hi", max_new_tokens=2.5), "max_new_tokens must be an int >= 1, not 2.5"),
    (dict(prompt="hi", max_new_tokens=None), "max_new_tokens must be an int >= 1, not None"),
    (dict(prompt="hi", max_new_tokens="3"), "max_new_tokens must be an int >= 1, not '3'"),
    (dict(prompt=[1.7, 2.2]), r"token ids must be a list of ints: 1.7 is a float"),
    (dict(prompt=["a"]), "token ids must be a list of ints: 'a' is a str"),
    (dict(prompt=b"ab"), "token ids must be a list of ints, not bytes"),
    (dict(prompt=[2 ** 70]), r"token ids must be in \[0, 256\), not 1180591620717411303424"),
    (dict(prompt=np.array([1.0, 2.0])), "1-D array of ints"),
    (dict(prompt=[1, 2], stop=["a"]), "stop strings end text: give the prompt as text"),
    (dict(prompt="hi", stop=""), "a stop string must not be empty"),
    (dict(prompt="hi", stop=[3]), "stop must be a string or a list of strings"),
    (dict(prompt="hi", temperature=float("inf")), "temperature must be a finite number"),
    (dict(prompt="hi", seed=-1), r"seed must be an int in \[0, 2\*\*63\)"),
    (dict(prompt="hi", seed=1.5), r"seed must be an int in \[0, 2\*\*63\)"),
    (dict(prompt="a\ud800b"), "not valid Unicode: '\\\\ud800' at position 1"),
    (dict(prompt=""), "the prompt is empty: give at least one token of text"),
    (dict(prompt=[]), "the prompt is empty: give at least one token id"),
]


@pytest.mark.parametrize("call, message", BAD_CALLS)
def test_bad_values_are_usage_errors_that_say_what_is_allowed(chat_artifact, call, message):
    """Issue 17: every value a caller can get wrong is an LlmcError (a UsageError: the CLI's exit
    2) naming what is allowed; nothing is truncated or ignored."""
    from llmc.errors import UsageError

    model = llmc.load(chat_artifact, max_context=64)
    call = dict(call)
    with pytest.raises(UsageError, match=message):
        model.generate(call.pop("prompt"), **{"max_new_tokens": 2, **call})


@pytest.mark.parametrize("messages, message", [
    (None, "messages must be a non-empty list"), ([], "messages must be a non-empty list"),
    ([{"role": "user", "content": 5}], "message 0's content must be a string"),
    ([{"role": "wizard", "content": "x"}], "message 0 needs a role, one of system, user"),
    (["hello"], "message 0 needs a role")])
def test_bad_chat_messages_are_usage_errors(chat_artifact, messages, message):
    from llmc.errors import UsageError

    with pytest.raises(UsageError, match=message):
        llmc.load(chat_artifact, max_context=64).chat(messages, max_new_tokens=2)


def test_good_values_of_other_types_are_taken(chat_artifact):
    """numpy integers are ints: as token ids, top_k, seed and max_new_tokens."""
    model = llmc.load(chat_artifact, max_context=64)
    want = model.generate([1, 2, 3], max_new_tokens=4, temperature=0.7, top_k=5, seed=3)
    got = model.generate(np.array([1, 2, 3]), max_new_tokens=np.int64(4), temperature=0.7, top_k=np.int64(5),
                         seed=np.int32(3))
    assert got == want and len(got) == 4


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2", 10 ** 4])
def test_thread_counts_outside_the_cpus_are_refused(chat_artifact, threads):
    import os

    from llmc.errors import UsageError

    cpus = len(os.sched_getaffinity(0))
    with pytest.raises(UsageError, match=f"threads must be an int from 1 to {cpus}"):
        llmc.load(chat_artifact, threads=threads)


PROMPTS = ["Once upon a time", "The capital of France", "1, 2, 3,", "def main():"]


def test_threads_sharing_one_model_each_get_their_own_output(chat_artifact):
    """Issue 17: several threads calling generate on one Model each get the output they would
    alone (before: garbage in 12 of 12 trials, with no error)."""
    import threading

    model = llmc.load(chat_artifact, max_context=64)
    alone = {p: model.generate(p, max_new_tokens=12) for p in PROMPTS}
    got, failures = [], []

    def work(prompt):
        try:
            for _ in range(3):
                got.append((prompt, model.generate(prompt, max_new_tokens=12)))
                stream = "".join(model.generate(prompt, max_new_tokens=12, stream=True))
                got.append((prompt, stream))
        except Exception as error:      # noqa: BLE001 -- a failure in a thread is reported by the test
            failures.append(error)

    threads = [threading.Thread(target=work, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert len(got) == 6 * len(PROMPTS)
    assert [text for p, text in got] == [alone[p] for p, text in got]


def test_interleaved_streams_on_one_model_stay_correct(chat_artifact):
    """Two live streams on one handle, consumed in turns and with other calls between their
    tokens, each give what they give alone: no conversation's tokens leak into the other's."""
    model = llmc.load(chat_artifact, max_context=64)
    alone = [model.generate(p, max_new_tokens=16, stream=True) for p in PROMPTS[:2]]
    alone = [list(s) for s in alone]
    ids = [1, 2, 3, 4, 5]
    alone_ids = model.generate(ids, max_new_tokens=16)
    streams = [model.generate(p, max_new_tokens=16, stream=True) for p in PROMPTS[:2]]
    by_ids = model.generate(ids, max_new_tokens=16, stream=True)
    got, got_ids = [[], []], []
    for turn in range(40):
        for i, s in enumerate(streams):
            piece = next(s, None)
            if piece is not None:
                got[i].append(piece)
        if turn % 3 == 0:
            got_ids.extend(next(by_ids, []))
            model.logits([7, 8, 9])         # another call writes the one sequence's blocks
    got_ids.extend(t for piece in by_ids for t in piece)
    assert got == alone
    assert got_ids == alone_ids
