"""Target cpu end to end: every family's artifact generates what transformers generates; quantized
and int8-KV artifacts agree with the reference target; chunked prefill, determinism, and the
errors a build or a load can meet."""

import numpy as np
import pytest

from conftest import FAMILIES, relative_error
from llmc.compiler import compile_model
from llmc.errors import LlmcError
from test_runtime import greedy_reference

import llmc


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_fp32_greedy_matches_transformers_for_64_tokens(families, name, tmp_path):
    model, imported = families[name]
    path = tmp_path / f"{name}.llmc"
    compile_model(imported, path, target="cpu", progress=None)
    loaded = llmc.load(path, max_context=128)
    assert loaded.manifest["target"]["name"] == "cpu"
    ids = [5, 77, 3, 101, 64, 9, 12, 1, 33]
    assert loaded.generate(ids, max_new_tokens=64) == greedy_reference(model, ids, 64)


@pytest.mark.slow
@pytest.mark.parametrize("quant,kv,activations,tolerance", [
    ("f16", "f32", "int8", 1e-5), ("f32", "int8", "int8", 1e-5), ("q8", "f32", "int8", 2e-2),
    ("q4g32", "f32", "int8", 2e-2), ("q4g32", "f32", "f32", 1e-5), ("q8", "f32", "f32", 1e-5)])
def test_compiled_formats_agree_with_the_reference_target(families, tmp_path, quant, kv, activations, tolerance):
    """q8/q4 kernels round activations to int8 per block of 32 (as llama.cpp does); the reference
    multiplies by the dequantized weight exactly, hence the looser tolerance there. With
    quant_activations f32 the cpu target does what the reference does."""
    _, imported = families["llama"]
    ids = list(np.random.default_rng(5).integers(0, 128, 41))
    logits = {}
    for target in ("cpu", "ref"):
        path = tmp_path / f"{target}.llmc"
        options = {"quant_activations": activations} if target == "cpu" else {}
        compile_model(imported, path, target=target, quant=quant, kv=kv, progress=None, **options)
        loaded = llmc.load(path, max_context=64)
        logits[target] = loaded.logits(ids)
        if target == "cpu":       # q4g32 and q8 on int8 activations run from the target's panels (layout.py)
            assert bool(loaded.manifest["target"]["layouts"]) == (quant in ("q4g32", "q8") and activations == "int8")
            assert loaded.manifest["options"]["quant_activations"] == activations
    assert relative_error(logits["cpu"], logits["ref"]) < tolerance


@pytest.mark.slow
def test_prompts_longer_than_a_chunk_are_split(families, tmp_path):
    model, imported = families["mistral"]                # sliding window 16 < the chunks' span
    whole, chunked = tmp_path / "whole.llmc", tmp_path / "chunked.llmc"
    compile_model(imported, whole, progress=None)
    compile_model(imported, chunked, chunk=7, progress=None)
    ids = list(np.random.default_rng(8).integers(0, 128, 45))
    a, b = llmc.load(whole, max_context=100), llmc.load(chunked, max_context=100)
    assert b.manifest["target"]["chunk"] == 7
    np.testing.assert_allclose(b.logits(ids), a.logits(ids), rtol=1e-5, atol=1e-5)
    assert b.generate(ids, max_new_tokens=20) == a.generate(ids, max_new_tokens=20) == \
        greedy_reference(model, ids, 20)


def test_threads_do_not_change_the_result(families, tmp_path):
    _, imported = families["qwen2"]
    path = tmp_path / "q.llmc"
    compile_model(imported, path, progress=None)
    ids = list(range(3, 40))
    one, two = llmc.load(path, threads=1), llmc.load(path, threads=2)
    assert one.executor.threads == 1 and two.executor.threads == 2
    np.testing.assert_array_equal(one.logits(ids), two.logits(ids))


@pytest.mark.slow
def test_builds_are_byte_identical(families, tmp_path, monkeypatch):
    """Two builds from scratch (separate build caches) give the same library and the same artifact."""
    _, imported = families["gemma"]
    files = []
    for run in ("a", "b"):
        monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / f"cache-{run}"))
        files.append(tmp_path / f"{run}.llmc")
        compile_model(imported, files[-1], progress=None)
    assert files[0].read_bytes() == files[1].read_bytes()


def test_missing_cpu_features_are_refused(families, tmp_path):
    from llmc.artifact import read_artifact

    _, imported = families["llama"]
    path = tmp_path / "v3.llmc"
    compile_model(imported, path, cpu_level="x86-64-v3", progress=None)
    assert "avx2" in read_artifact(path).manifest["requires"]["cpu_features"]
    with pytest.raises(LlmcError, match="needs CPU features avx.*avx2.*rebuild"):
        read_artifact(path, features={"sse2"})
    portable = tmp_path / "portable.llmc"
    compile_model(imported, portable, cpu_level="portable", progress=None)
    assert read_artifact(portable, features={"sse2"}).manifest["requires"]["cpu_features"] == []


def test_compiler_errors_name_the_generated_file(tmp_path, monkeypatch):
    from llmc.targets.cpu.build import BuildError, build_shared_library

    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path))
    with pytest.raises(BuildError, match=r"failed on the generated code .*model\.c: .*error"):
        build_shared_library("int broken = ;\n", "portable")


def test_ops_without_a_kernel_are_named(tmp_path):
    from llmc.ir import parse_graph
    from llmc.targets.cpu.lower import LoweringError, WeightTable, lower_graph

    graph = parse_graph("""graph @forward(%tokens: i64[seq], %positions: i64[seq]) {
  %0 = cast(%tokens) {dtype="f32"} : f32[seq]
  %1 = reshape(%0) {shape=[1, "seq"]} : f32[1, seq]
  %2 = softmax(%1) {axis=1} : f32[1, seq]
  return %2
}""")
    with pytest.raises(LoweringError, match="no kernel for op 'softmax'.*--target ref"):
        lower_graph(graph, "f", WeightTable(), lambda *a: {"gemv": 1, "gemm": 1}, 16)


@pytest.mark.parametrize("option,message", [({"cpu_level": "avx9"}, "unknown cpu feature level 'avx9'; choose"),
                                            ({"tune": "fastest"}, "unknown tuning mode 'fastest'; choose off"),
                                            ({"chunk": 0}, "prefill chunk must be a positive")])
def test_bad_cpu_options_fail_before_tracing(tmp_path, option, message):
    """A module that fails the moment it is traced: the options must be refused before that."""
    import torch

    class Untraceable(torch.nn.Module):
        def forward(self, input_ids):
            raise AssertionError("traced")

    with pytest.raises(LlmcError, match=message):
        compile_model(Untraceable(), tmp_path / "x.llmc", progress=None, **option)


def test_bandwidth_probe_reads_everything_with_the_models_threads(families, tmp_path):
    _, imported = families["llama"]
    path = tmp_path / "b.llmc"
    compile_model(imported, path, progress=None)
    model = llmc.load(path, threads=2)
    probe = model.executor.lib.llmc_stream_read
    data = np.arange(1001, dtype=np.float32)
    assert probe(data.ctypes.data, data.size) == float(data.sum(dtype=np.float64))
    assert model.executor.stream_bandwidth(megabytes=16, runs=2) > 0


def test_profile_counts_every_op_of_every_step(chat_artifact):
    from llmc.runtime.profile import format_profile

    model = llmc.load(chat_artifact, threads=2)
    assert model.executor.profile() is None                   # off unless asked
    assert model.executor.start_profile()
    quiet = model.generate([1, 2, 3], max_new_tokens=1)       # what profiling must not change
    first = model.executor.profile(reset=True)
    assert first.steps == 1
    model.executor.start_profile()
    assert model.generate([1, 2, 3], max_new_tokens=5)[:1] == quiet
    got = model.executor.profile()
    assert got.steps == 5                                     # one prefill step, four decode steps
    kinds = got.by_kind()
    # every kernel the build reports has a row, with as many sites as call sites
    for kernel, sites in model.manifest["target"]["kernels"].items():
        assert sum(n for _, n in kinds[kernel.removeprefix("llmc_")].values()) == sites
    assert any(kind.startswith("loop ") for kind in kinds)
    assert all(seconds >= 0 for _, seconds in got.sites)
    inside = sum(seconds for _, seconds in got.sites)
    assert 0 < inside <= got.wall
    table = format_profile(got)
    assert "5 steps" in table and "attention" in table and "host:" in table
    assert model.executor.profile(reset=True).steps == 5 and model.executor.profile().steps == 0


def test_llmc_profile_prints_a_table_when_the_process_exits(chat_artifact):
    import os
    import subprocess
    import sys

    code = f"import llmc; llmc.load({str(chat_artifact)!r}).generate([1, 2], max_new_tokens=3)"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    profiled = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "LLMC_PROFILE": "1"})
    assert plain.returncode == profiled.returncode == 0
    assert "llmc profile" not in plain.stderr
    assert "llmc profile of" in profiled.stderr and "3 steps" in profiled.stderr


def test_fused_elementwise_loops_match_the_interpreter(tmp_path):
    """A fused body mixing float math, comparisons, where and casts, as group_elementwise makes it,
    lowered to one loop and run against the reference interpreter (the families' graphs have no
    chain left to fuse, so this is the loop generator's only end-to-end check)."""
    import ctypes

    from llmc.interpret import run
    from llmc.ir import parse_graph
    from llmc.passes.elementwise import group_elementwise
    from llmc.targets.cpu import compile_graphs
    from llmc.targets.cpu.launch import load_library

    graph = group_elementwise(parse_graph("""graph @forward(%tokens: i64[seq], %positions: i64[seq]) {
  %0 = add(%tokens, %positions) : i64[seq]
  %1 = cast(%0) {dtype="f32"} : f32[seq]
  %2 = const() {dtype="f32", value=0.37} : f32[]
  %3 = mul(%1, %2) : f32[seq]
  %4 = sin(%3) : f32[seq]
  %5 = gt(%4, %2) : bool[seq]
  %6 = exp(%3) : f32[seq]
  %7 = neg(%4) : f32[seq]
  %8 = where(%5, %6, %7) : f32[seq]
  %9 = cast(%5) {dtype="f32"} : f32[seq]
  %10 = add(%8, %9) : f32[seq]
  %11 = reshape(%10) {shape=[1, "seq"]} : f32[1, seq]
  return %11
}"""))
    steps = {step[0] for n in graph.nodes() if n.op == "fused" for step in n.attrs["body"]}
    assert {"where", "cast", "exp", "add"} <= steps
    built = compile_graphs({"g": graph})
    lib = load_library(built.code)
    tokens = np.arange(3, 40, dtype=np.int64)
    positions, zeros = tokens + 5, np.zeros(tokens.size, np.int64)
    arena = np.zeros(built.manifest["arena_bytes"] + 64, np.uint8)
    out = np.full((1, tokens.size), np.nan, np.float32)
    pointer = [ctypes.c_void_p(a.ctypes.data) for a in (tokens, positions, zeros, arena, out)]
    status = lib.llmc_g(ctypes.c_int64(tokens.size), pointer[0], pointer[1], pointer[2], ctypes.c_int64(1),
                        ctypes.c_int64(1), pointer[2], ctypes.c_int64(1), pointer[2], ctypes.c_int64(1), None, None,
                        pointer[3], pointer[4])
    assert status == 0
    want = run(graph, [tokens, positions])[0]
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_independent_loops_in_a_row_share_one_barrier(tmp_path):
    """exp, sin and cos of the same input do not wait for each other; the add that reads two of
    them does."""
    import ctypes
    from pathlib import Path

    from llmc.interpret import run
    from llmc.ir import parse_graph
    from llmc.targets.cpu import compile_graphs
    from llmc.targets.cpu.launch import load_library

    graph = parse_graph("""graph @forward(%tokens: i64[seq], %positions: i64[seq]) {
  %0 = add(%tokens, %positions) : i64[seq]
  %1 = cast(%0) {dtype="f32"} : f32[seq]
  %2 = exp(%1) : f32[seq]
  %3 = sin(%1) : f32[seq]
  %4 = cos(%1) : f32[seq]
  %5 = add(%3, %4) : f32[seq]
  %6 = mul(%2, %5) : f32[seq]
  %7 = reshape(%6) {shape=[1, "seq"]} : f32[1, seq]
  return %7
}""")
    built = compile_graphs({"g": graph})
    code = Path(built.source_path).read_text()
    body = code[code.index("llmc_g("):]
    loops = [line.split("*/")[0].split()[2] for line in body.split("\n") if "/* %" in line]
    assert loops[4:7] == ["exp", "sin", "cos"]        # in this order: three independent loops in a row
    # exp, sin and cos share the barrier after cos; the cast before them and the add after wait
    assert body.count("#pragma omp for schedule(static) nowait") == 2
    lib = load_library(built.code)
    tokens = np.arange(3, 500, dtype=np.int64) % 37        # at most a chunk (512)
    positions, zeros = tokens * 3 % 11, np.zeros(tokens.size, np.int64)
    arena = np.zeros(built.manifest["arena_bytes"] + 64, np.uint8)
    out = np.full((1, tokens.size), np.nan, np.float32)
    pointer = [ctypes.c_void_p(a.ctypes.data) for a in (tokens, positions, zeros, arena, out)]
    lib.llmc_set_threads(2)
    for _ in range(20):
        status = lib.llmc_g(ctypes.c_int64(tokens.size), pointer[0], pointer[1], pointer[2], ctypes.c_int64(1),
                            ctypes.c_int64(1), pointer[2], ctypes.c_int64(1), pointer[2], ctypes.c_int64(1), None,
                            None, pointer[3], pointer[4])
        assert status == 0
        np.testing.assert_allclose(out, run(graph, [tokens, positions])[0], rtol=1e-5, atol=1e-5)


def test_tuning_a_level_this_machine_cannot_run_is_refused(families):
    from llmc.errors import UsageError
    from llmc.targets.cpu import compile_graphs

    _, imported = families["llama"]
    with pytest.raises(UsageError, match="cannot tune x86-64-v3 kernels on this machine, which lacks avx.*--tune off"):
        compile_graphs({"graph": imported.graph}, level="x86-64-v3", tune="fast", features={"sse2"})


def test_an_unknown_activation_format_is_refused_before_anything_is_traced():
    from llmc import targets
    from llmc.errors import UsageError

    with pytest.raises(UsageError, match="unknown activation format 'bf16' for quantized linears; choose int8, f32"):
        targets.get("cpu").make_options({"quant_activations": "bf16"})
    assert targets.get("cpu").make_options({"quant_activations": "f32"}).quant_activations == "f32"
