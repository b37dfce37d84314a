"""Target cuda without a GPU: artifacts cross-compiled here, their plans run kernel by kernel by
Triton's interpreter (the emulator) and compared with the cpu target's logits; the launcher's
refusals on a machine without a driver; reproducible builds."""

import os

import numpy as np
import pytest

from conftest import FAMILIES, relative_error, tiny_model
from llmc.artifact import read_artifact
from llmc.compiler import compile_model
from llmc.errors import LlmcError
from llmc.targets.cuda.emulate import EmulatedExecutor
from llmc.targets.cuda.launch import pick_arch

import llmc


@pytest.fixture(scope="module")
def families():
    from llmc.frontend import import_model

    return {name: import_model(tiny_model(name)) for name in FAMILIES}


def build_pair(imported, folder, **options):
    cuda, cpu = folder / "m-cuda.llmc", folder / "m-cpu.llmc"
    compile_model(imported, cuda, target="cuda", arch="sm_80", progress=None, **options)
    cpu_options = {k: v for k, v in options.items() if k != "act"}
    compile_model(imported, cpu, target="cpu", progress=None, **cpu_options)
    return cuda, cpu


def emulated(path, max_context=64):
    os.environ["LLMC_CUDA_EMULATE"] = "1"
    try:
        return llmc.load(path, max_context=max_context)
    finally:
        del os.environ["LLMC_CUDA_EMULATE"]


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_and_decode_match_the_cpu_artifact(families, name, tmp_path):
    cuda, cpu = build_pair(families[name], tmp_path)
    gpu, host = emulated(cuda), llmc.load(cpu, max_context=64)
    ids = list(np.random.default_rng(3).integers(0, 128, 29))        # past mistral's window of 16
    assert relative_error(gpu.logits(ids), host.logits(ids)) < 3e-3
    for model in (gpu, host):
        model.step(ids[:20], 0)
    for pos in range(20, 23):                                          # decode steps over the cache
        assert relative_error(gpu.step([ids[pos]], pos), host.step([ids[pos]], pos)) < 3e-3


@pytest.mark.parametrize("quant,tolerance", [("q8", 2e-2), ("q4g32", 2e-2)])
def test_quantized_builds_match_the_cpu_artifact(families, tmp_path, quant, tolerance):
    """The cpu target's q8/q4 decode rounds activations to int8, hence the looser tolerance."""
    cuda, cpu = build_pair(families["llama"], tmp_path, quant=quant)
    gpu, host = emulated(cuda), llmc.load(cpu, max_context=64)
    ids = list(np.random.default_rng(4).integers(0, 128, 17))
    assert relative_error(gpu.logits(ids), host.logits(ids)) < tolerance
    gpu.step(ids, 0), host.step(ids, 0)
    assert relative_error(gpu.step([5], 17), host.step([5], 17)) < tolerance


def test_bf16_activations_decode_like_the_cpu_artifact(families, tmp_path):
    """bf16 keeps 8 bits of mantissa. Fed one token per step, so only decode kernels run: Triton
    3.9's interpreter gets tl.dot of bf16 operands wrong (a GPU does not), which rules the
    interpreter out for bf16 prefill tiles; the same tiles are checked in fp16."""
    cuda, cpu = build_pair(families["llama"], tmp_path, act="bf16", quant="f16")
    gpu, host = emulated(cuda), llmc.load(cpu, max_context=64)
    for pos, token in enumerate(np.random.default_rng(4).integers(0, 128, 9)):
        assert relative_error(gpu.step([token], pos), host.step([token], pos)) < 3e-2


def test_greedy_and_sampled_generation_on_the_device(families, tmp_path):
    cuda, cpu = build_pair(families["qwen2"], tmp_path)
    gpu, host = emulated(cuda), llmc.load(cpu, max_context=64)
    ids = [5, 77, 3, 101, 64, 9]
    assert gpu.generate(ids, max_new_tokens=6) == host.generate(ids, max_new_tokens=6)     # argmax on the device
    options = dict(max_new_tokens=5, temperature=0.8, top_k=20, top_p=0.9, seed=4)
    first, again = gpu.generate(ids, **options), gpu.generate(ids, **options)
    assert first == again and all(0 <= t < 128 for t in first) and len(first) == 5


def test_artifact_records_cubins_per_arch_and_plans(families, tmp_path):
    path = tmp_path / "m.llmc"
    compile_model(families["llama"], path, target="cuda", arch="sm_90,sm_80,sm_86", progress=None)
    art = read_artifact(path)
    target = art.manifest["target"]
    assert target["arches"] == ["sm_80", "sm_86", "sm_90"]
    assert art.manifest["requires"]["cuda_arches"] == ["sm_80", "sm_86", "sm_90"]
    for arch in target["arches"]:
        cubins = art.section(f"cubin_sm{arch[3:]}")
        assert bytes(cubins[:4]) == b"\x7fELF" and len(target["kernels"][arch]) >= 10
    assert EmulatedExecutor(art, arch="sm_86").program.arch == "sm_86"


def test_builds_are_byte_identical_across_caches(families, tmp_path, monkeypatch):
    paths = []
    for run in ("a", "b"):
        monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / f"cache-{run}"))
        paths.append(tmp_path / f"{run}.llmc")
        compile_model(families["gemma"], paths[-1], target="cuda", arch="sm_80", quant="q8", progress=None)
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_loading_without_a_gpu_is_a_clear_error(families, tmp_path, capsys):
    from llmc.cli import main

    path = tmp_path / "m.llmc"
    compile_model(families["llama"], path, target="cuda", arch="sm_80", progress=None)
    with pytest.raises(LlmcError, match="libcuda|GPU"):
        llmc.load(path)
    assert main(["run", str(path), "hello"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_the_launcher_picks_a_compatible_arch_or_names_the_ones_there():
    assert pick_arch(["sm_80", "sm_90"], 8, 6, "m.llmc") == "sm_80"           # sm_80 cubins run on sm_86
    assert pick_arch(["sm_80", "sm_86", "sm_90"], 8, 9, "m.llmc") == "sm_86"
    assert pick_arch(["sm_80", "sm_90"], 9, 0, "m.llmc") == "sm_90"
    with pytest.raises(LlmcError, match="sm_80, sm_86.*sm_75"):
        pick_arch(["sm_80", "sm_86"], 7, 5, "m.llmc")


def test_bad_cuda_options_are_refused_before_tracing(tmp_path):
    with pytest.raises(LlmcError, match="unknown cuda arch 'sm_70'"):
        compile_model("no-such-model-dir", tmp_path / "m.llmc", target="cuda", arch="sm_70", progress=None)
    with pytest.raises(LlmcError, match="activation dtype"):
        compile_model("no-such-model-dir", tmp_path / "m.llmc", target="cuda", act="f32", progress=None)
    with pytest.raises(LlmcError, match="int8 KV"):
        compile_model("no-such-model-dir", tmp_path / "m.llmc", target="cuda", kv="int8", progress=None)
