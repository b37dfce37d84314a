"""The artifact ABI: the step entry point as the manifest declares it and the loader checks it,
batches the step refuses, and batched steps against single-sequence runs (cpu: bitwise)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_model
from llmc import abi
from llmc.artifact import ArtifactError, read_artifact, write_artifact
from llmc.compiler import compile_model

import llmc


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """qwen2 (untied head, attention bias) for cpu, ref and onnx, mistral (sliding window of 16) for
    cpu and onnx (an f16 pool) with blocks of 4, and mixtral (four experts, top 2) for cpu in q4g32
    (experts in panels)."""
    import transformers

    folder = tmp_path_factory.mktemp("abi")
    qwen, mistral = tiny_model("qwen2"), tiny_model("mistral")
    mixtral = tiny_model("mixtral", config=transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))
    out = {}
    for name, model, target, options in [("cpu", qwen, "cpu", {"chunk": 24}), ("ref", qwen, "ref", {}),
                                         ("cpu-window", mistral, "cpu", {"block_size": 4}),
                                         ("cpu-moe", mixtral, "cpu", {"quant": "q4g32"}),
                                         ("onnx", qwen, "onnx", {"chunk": 24}),
                                         ("onnx-window", mistral, "onnx", {"block_size": 4, "kv": "f16"})]:
        out[name] = folder / f"{name}.llmc"
        compile_model(model, out[name], target=target, progress=None, **options)
    return out


def llmc_cli(*args):
    return subprocess.run([sys.executable, "-m", "llmc", *map(str, args)], capture_output=True, text=True, timeout=300)


def one_error_line(result) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_inspect_lists_the_entry_point_and_the_kv_pool(artifacts):
    shown = llmc_cli("inspect", artifacts["cpu"])
    assert shown.returncode == 0, shown.stderr
    assert ("entry     step(tokens: i64[seq], positions: i64[seq], seq_index: i64[seq], block_tables: "
            "i64[seqs, max_blocks], logit_rows: i64[rows], k_cache: f16[2, blocks, 2, 16, 16], v_cache: "
            "f16[2, blocks, 2, 16, 16]) -> logits: f32[rows, 128]  (at most 24 tokens a call)") in shown.stdout
    # keys and values, 2 layers, 2 kv heads, 16 positions of 16 halves (the default KV cache)
    assert ("kv pool   [layers, blocks, kv_heads, block_size, head_dim]: blocks of 16 tokens, f16, "
            f"{2 * 2 * 2 * 16 * 16 * 2} bytes per block (k_cache, v_cache)") in shown.stdout
    manifest = read_artifact(artifacts["cpu-window"]).manifest
    assert manifest["kv_pool"]["block_size"] == 4 and manifest["options"]["block_size"] == 4


def rewritten(path, tmp_path, change, version=None, monkeypatch=None):
    """A copy of the artifact whose manifest ``change`` edited (checksums recomputed, as a tool that
    edits the JSON would)."""
    art = read_artifact(path)
    manifest = json.loads(json.dumps(art.manifest))
    sections = {name: bytes(art.section(name)) for name in manifest["sections"]}
    for key in ("sections", "format_version"):
        manifest.pop(key)
    change(manifest)
    out = tmp_path / f"edited-{len(list(tmp_path.iterdir()))}.llmc"
    if version is not None:
        monkeypatch.setattr("llmc.artifact.FORMAT_VERSION", version)
    write_artifact(out, manifest, sections)
    if version is not None:
        monkeypatch.undo()
    return out


def test_a_v1_artifact_is_refused_with_what_to_do(artifacts, tmp_path, monkeypatch):
    old = rewritten(artifacts["ref"], tmp_path, lambda m: None, version=1, monkeypatch=monkeypatch)
    with pytest.raises(ArtifactError, match="format version 1, from an older llmc.*rebuild it with `llmc compile`"):
        llmc.load(old)
    assert "rebuild it" in one_error_line(llmc_cli("run", old, "hi"))


def test_a_missing_or_different_entry_point_is_one_clear_line(artifacts, tmp_path):
    def drop_step(m):
        m["entry_points"] = {"decode": m["entry_points"].pop("step")}

    def narrower_tokens(m):
        m["entry_points"]["step"]["inputs"][0] = ["tokens", "i32[seq]"]

    def no_pool_input(m):
        m["entry_points"]["step"]["inputs"].pop()

    def other_output(m):
        m["entry_points"]["step"]["outputs"] = [["logits", "f32[1, 128]"]]

    cases = [(drop_step, "has no 'step' entry point (it declares decode); rebuild it"),
             (narrower_tokens, "entry point 'step' takes (tokens: i32[seq], "),
             (no_pool_input, "but this llmc calls it with (tokens: i64[seq], "),
             (other_output, "returns (logits: f32[1, 128]), not logits f32[rows, 128]")]
    for change, message in cases:
        edited = rewritten(artifacts["cpu"], tmp_path, change)
        with pytest.raises(abi.AbiError) as info:
            llmc.load(edited)
        assert message in str(info.value)
        line = one_error_line(llmc_cli("run", edited, "hi"))
        assert message in line and "rebuild" in line


def test_batches_the_step_cannot_take_are_refused(artifacts):
    model = llmc.load(artifacts["cpu"], max_context=64)          # 4 blocks of 16
    good = abi.Batch.single(np.array([5, 6, 7]), 0, np.arange(4), "last")

    def edited(**changes):
        fields = dict(good.inputs())
        fields.update({k: np.asarray(v, np.int64) for k, v in changes.items()})
        return abi.Batch(**fields)

    cases = [(edited(tokens=np.arange(30), positions=np.arange(30), seq_index=np.zeros(30)), "1 to 24 tokens"),
             (edited(positions=[0, 1]), "one entry per token"),
             (edited(logit_rows=[3]), "logit_rows must name"),
             (edited(tokens=[5, 6, 128]), "token ids must be in [0, 128)"),
             (edited(seq_index=[0, 0, 1]), "one of the 1 block tables"),
             (edited(positions=[0, 1, 70]), "needs more than the 4 blocks"),
             (edited(block_tables=[[0, 9, 1, 2]], positions=[0, 1, 20]), "outside the pool of 4 blocks"),
             (edited(positions=[-1, 0, 1]), "positions must be >= 0"),
             (edited(logit_rows=[0, 1, 2, 2]), "logit_rows must name 1 to 3"),
             (edited(positions=[0, 1, 1]), "write the same KV slot"),
             (edited(block_tables=[[0, 1, 2, 3], [0, 1, 2, 3]], seq_index=[0, 1, 1], positions=[5, 5, 6]),
              "write the same KV slot")]
    for batch, message in cases:
        with pytest.raises(abi.AbiError, match=message.replace("[", r"\[").replace(")", r"\)")):
            model.run_batch(batch)
    far = abi.Batch.single(np.array([5]), 300, np.arange(20), "last")
    with pytest.raises(abi.AbiError, match="position 300 is past the model's 256 positions"):
        llmc.load(artifacts["cpu"], max_context=256).run_batch(far)
    # Past the Python check, the library checks what it is given and refuses, without a crash.
    for batch, _ in cases[2:8]:
        with pytest.raises(ArtifactError, match="the cpu library refused a step"):
            model.executor.run(abi.STEP, batch.inputs())
    assert model.run_batch(good).shape == (1, 128)


def random_schedule(rng, lengths: list[int], prompts: list[int], max_tokens: int):
    """Steps of a continuous-batching run: each step, some sequences add a prefill chunk (while in
    their prompt) or one token (after it), in a shuffled order, within max_tokens."""
    done = [0] * len(lengths)
    steps = []
    while any(d < n for d, n in zip(done, lengths)):
        segments, budget = [], max_tokens
        for s in rng.permutation(len(lengths)):
            if done[s] >= lengths[s] or budget == 0 or rng.random() < 0.25:
                continue
            want = int(rng.integers(1, 9)) if done[s] < prompts[s] else 1
            take = min(want, lengths[s] - done[s], budget, max(prompts[s] - done[s], 1))
            segments.append((int(s), done[s], take))
            done[s] += take
            budget -= take
        if segments:
            steps.append(segments)
    return steps


@pytest.mark.parametrize("name", ["cpu", "ref", "cpu-window", "cpu-moe", "onnx", "onnx-window"])
def test_batched_steps_match_single_sequence_runs(artifacts, name):
    """Random mixes of prefill chunks and decode tokens from up to five sequences, over block
    tables scattered across the pool, give every token the logits of its sequence run alone —
    bitwise on the cpu target (no reduction depends on the batch), to float rounding on ref and
    onnx (ONNX Runtime's MatMul tiles by the number of rows)."""
    exact = name.startswith("cpu")
    batched = llmc.load(artifacts[name], max_context=64, kv_blocks=256 // 4)
    alone = llmc.load(artifacts[name], max_context=64)
    bs = batched.layout.block_size
    rng = np.random.default_rng(11 if exact else 7)
    for trial in range(4 if exact else 2):
        count = int(rng.integers(1, 6))
        # One sequence ends exactly at a block's end; the others have random lengths.
        lengths = [2 * bs] + [int(rng.integers(1, 40)) for _ in range(count - 1)]
        prompts = [int(rng.integers(1, n + 1)) for n in lengths]
        tokens = [rng.integers(0, 128, n) for n in lengths]
        need = [-(-n // bs) for n in lengths]
        free = rng.permutation(batched.kv_blocks)
        tables = np.zeros((count, max(need)), np.int64)
        at = 0
        for s, k in enumerate(need):
            tables[s, :k] = free[at: at + k]
            at += k
        got = [np.zeros((n, 128), np.float32) for n in lengths]
        for segments in random_schedule(rng, lengths, prompts, batched.max_tokens):
            parts = [(s, np.arange(start, start + n)) for s, start, n in segments]
            batch = abi.Batch(np.concatenate([tokens[s][p] for s, p in parts]),
                              np.concatenate([p for _, p in parts]),
                              np.concatenate([np.full(p.size, s) for s, p in parts]).astype(np.int64),
                              tables, np.arange(sum(p.size for _, p in parts), dtype=np.int64))
            logits = batched.run_batch(batch)
            row = 0
            for s, p in parts:
                got[s][p] = logits[row: row + p.size]
                row += p.size
        for s in range(count):
            want = alone.logits(tokens[s])
            if not exact:
                np.testing.assert_allclose(got[s], want, rtol=1e-5, atol=1e-5)
            else:
                assert np.array_equal(got[s], want), f"trial {trial}: sequence {s} of {count} differs when batched"
