"""Target cuda without a GPU: artifacts cross-compiled here, their plans run kernel by kernel by
Triton's interpreter (the emulator) and compared with the cpu target's logits, and batched steps
with single-sequence runs; the launcher's refusals on a machine without a GPU (and, on a machine
with one, the same artifacts on the device); reproducible builds."""

import ctypes
import json
import os

import numpy as np
import pytest

from conftest import FAMILIES, relative_error, tiny_model
from llmc import abi
from llmc.artifact import read_artifact
from llmc.compiler import compile_model
from llmc.errors import LlmcError
from llmc.runtime.sampler import SamplingParams
from llmc.targets.cuda import ARCHES, CHUNK
from llmc.targets.cuda.emulate import EmulatedExecutor
from llmc.targets.cuda.launch import pick_arch
from llmc.targets.cuda.plan import read_program, stage

import llmc

pytestmark = pytest.mark.slow          # cuda builds of every family, run in Triton's interpreter


def gpu_arch() -> str | None:
    """This machine's GPU as an arch name (sm_90), or None where no driver or GPU is usable."""
    from llmc.targets.cuda.driver import CudaError, Driver

    try:
        major, minor = Driver().arch()
    except CudaError:
        return None
    return f"sm_{major}{minor}"


GPU = gpu_arch()


@pytest.fixture(scope="module")
def families():
    from llmc.frontend import import_model

    return {name: import_model(tiny_model(name)) for name in FAMILIES}


@pytest.fixture(scope="module")
def llama_cuda(families, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-cuda") / "m.llmc"
    compile_model(families["llama"], path, target="cuda", arch="sm_80", progress=None)
    return path


def build_pair(imported, folder, **options):
    cuda, cpu = folder / "m-cuda.llmc", folder / "m-cpu.llmc"
    options = {"arch": "sm_80", **options}
    compile_model(imported, cuda, target="cuda", progress=None, **options)
    cpu_options = {k: v for k, v in options.items() if k not in ("act_dtype", "arch")}
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


def test_soft_capped_attention_decodes_like_the_cpu_artifact(tmp_path):
    """Gemma 2 (attention and final logits soft-capped) through both targets' kernels (the
    interleaved rope's Triton form is tests/test_cuda_kernels.py's)."""
    from llmc.frontend import import_model
    from test_families import tiny

    cuda, cpu = build_pair(import_model(tiny("gemma2")), tmp_path)
    gpu, host = emulated(cuda), llmc.load(cpu, max_context=64)
    ids = list(np.random.default_rng(5).integers(0, 128, 21))
    assert relative_error(gpu.logits(ids), host.logits(ids)) < 3e-3
    gpu.step(ids, 0), host.step(ids, 0)
    assert relative_error(gpu.step([7], 21), host.step([7], 21)) < 3e-3


def test_mixture_of_experts_decodes_like_the_cpu_artifact(tmp_path):
    """The moe kernels (route, sort by expert, the experts' matmuls, the weighted sum) of a q4
    Mixtral through a prefill and decode steps (float experts: tests/test_cuda_kernels.py).
    The routers are made decisive: near a tie between two experts, fp16 activations (cuda) and
    int8-rounded ones (cpu q4) may rightly choose differently, and that token then differs by far
    more than rounding (seen: one row of 19 at 7.7% with the tiny model's own router)."""
    import torch

    from llmc.frontend import import_model
    from test_families import tiny

    model, tolerance = tiny("mixtral"), 2e-2
    with torch.no_grad():
        for key, weight in model.named_parameters():
            if key.endswith("mlp.gate.weight"):
                weight.mul_(30)
    cuda, cpu = build_pair(import_model(model), tmp_path, quant="q4g32")
    gpu, host = emulated(cuda), llmc.load(cpu, max_context=64)
    ids = list(np.random.default_rng(9).integers(0, 128, 19))
    assert relative_error(gpu.logits(ids), host.logits(ids)) < tolerance
    gpu.step(ids, 0), host.step(ids, 0)
    for pos, token in enumerate([7, 90], start=19):
        assert relative_error(gpu.step([token], pos), host.step([token], pos)) < tolerance


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
    cuda, cpu = build_pair(families["llama"], tmp_path, act_dtype="bf16", quant="f16")
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


# (sequence, first position, tokens) per step: prefill chunks of two sequences; a mixed step of
# a third prompt, a chunk and one token; decode batches of three and two sequences (padded to
# buckets of 4 and 2); one sequence decoding alone.
SCHEDULE = [[(0, 0, 5), (1, 0, 4)], [(1, 4, 1), (2, 0, 3), (0, 5, 5)], [(0, 10, 1), (1, 5, 1), (2, 3, 1)],
            [(2, 4, 1), (0, 11, 1)], [(0, 12, 1)]]
PLANS_RUN = ["step", "step", "decode_batch", "decode_batch", "decode"]


@pytest.mark.slow
def test_a_batched_step_matches_single_sequence_runs(families, tmp_path):
    cuda = tmp_path / "m.llmc"
    compile_model(families["mistral"], cuda, target="cuda", arch="sm_80", block_size=4, progress=None)
    check_schedule(emulated(cuda))


@pytest.mark.skipif(GPU not in ARCHES, reason=f"needs an NVIDIA GPU of {', '.join(ARCHES)}")
def test_the_gpu_runs_steps_like_the_cpu_artifact_and_batches_like_single_runs(families, tmp_path):
    cuda, cpu = build_pair(families["mistral"], tmp_path, arch=GPU, block_size=4)
    gpu, host = llmc.load(cuda, max_context=64), llmc.load(cpu, max_context=64)
    ids = list(np.random.default_rng(3).integers(0, 128, 29))
    assert relative_error(gpu.logits(ids), host.logits(ids)) < 3e-3
    for model in (gpu, host):
        model.step(ids[:20], 0)
    for pos in range(20, 23):                          # decode steps: the captured graph replayed
        assert relative_error(gpu.step([ids[pos]], pos), host.step([ids[pos]], pos)) < 3e-3
    assert gpu.generate(ids, max_new_tokens=6) == host.generate(ids, max_new_tokens=6)
    check_schedule(gpu)


def check_schedule(model) -> None:
    """SCHEDULE's steps on a loaded cuda artifact: every row's logits as when its sequence runs
    alone, through the plans PLANS_RUN names; then a device-side greedy draw of the last step."""
    rng = np.random.default_rng(5)
    sequences = [rng.integers(0, 128, n) for n in (13, 6, 5)]
    alone = [model.logits(ids) for ids in sequences]          # each sequence by itself, every position
    # Each sequence's blocks scattered over the pool, in no order.
    tables = rng.permutation(model.kv_blocks)[:3 * 4].reshape(3, 4).astype(np.int64)
    executor, plans = model.executor, []
    run_plan = executor._execute
    executor._execute = lambda plan, env: (plans.append(plan), run_plan(plan, env))
    for step in SCHEDULE:
        batch = _batch(sequences, tables, step)
        logits = model.run_batch(batch)
        for row, (s, pos) in enumerate(zip(batch.seq_index, batch.positions)):
            assert relative_error(logits[row], alone[s][pos]) < 3e-3, (step, row)
    assert plans == PLANS_RUN
    last = _batch(sequences, tables, SCHEDULE[-1])            # the same step again writes the same K/V
    assert executor.sample(abi.STEP, last.inputs(), SamplingParams(), 0) == int(np.argmax(logits[0]))


def _batch(sequences, tables, step) -> abi.Batch:
    tokens, positions, seq_index = [], [], []
    for s, first, count in step:
        tokens += list(sequences[s][first:first + count])
        positions += range(first, first + count)
        seq_index += [s] * count
    arrays = [np.array(a, np.int64) for a in (tokens, positions, seq_index)]
    return abi.Batch(*arrays, tables, np.arange(len(tokens), dtype=np.int64))


def test_artifact_records_cubins_per_arch_and_plans(families, tmp_path):
    path = tmp_path / "m.llmc"
    compile_model(families["llama"], path, target="cuda", arch="sm_90,sm_80,sm_86", progress=None)
    art = read_artifact(path)
    target = art.manifest["target"]
    assert target["arches"] == ["sm_80", "sm_86", "sm_90"]
    assert target["max_tokens"] == CHUNK and target["kv_dtype"] == "f16"
    plans = json.loads(bytes(art.section("cuda_plan")).decode())["plans"]
    assert all(set(plans[arch]) == {"step", "decode", "decode_batch"} for arch in target["arches"])
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


def test_batches_are_staged_for_the_device(llama_cuda):
    """Sequences renumbered in id order with only their tables, the tables padded to the pool's
    width with the spare block, decode batches padded to their bucket, prefill tiles cut."""
    program = read_program(read_artifact(llama_cuda))
    tables = np.arange(8 * 3, dtype=np.int64).reshape(8, 3)
    decode = abi.Batch(np.array([3, 4, 5]), np.array([4, 9, 0]), np.array([7, 2, 5]), tables, np.array([2, 0]))
    staged = stage(decode.inputs(), program, width=6, blocks=20)
    assert staged.plan == "decode_batch" and staged.rows == 2
    assert staged.env == {"seq": 4, "rows": 4, "seqs": 4, "max_blocks": 6, "blocks": 21, "tiles": 0}
    assert staged.arrays["seq_index"].tolist() == [2, 0, 1, 3]
    assert staged.arrays["positions"].tolist() == [4, 9, 0, 0] and staged.arrays["logit_rows"].tolist()[:2] == [2, 0]
    device_tables = staged.arrays["block_tables"]
    assert (device_tables[:3, :3] == tables[[2, 5, 7]]).all() and (device_tables[:, 3:] == 20).all()
    assert (device_tables[3] == 20).all()
    one = abi.Batch(np.array([3]), np.array([17]), np.array([4]), tables, np.array([0]))
    assert stage(one.inputs(), program, width=6, blocks=20).plan == "decode"
    rows = program.plans["step"].tile_rows
    mixed = abi.Batch(np.zeros(rows + 2, np.int64), np.r_[np.arange(rows + 1), 9], np.r_[np.full(rows + 1, 6), 1],
                      tables, np.array([rows, rows + 1]))
    staged = stage(mixed.inputs(), program, width=6, blocks=20)
    assert staged.plan == "step" and staged.arrays["tiles"].tolist() == [[0, rows], [rows, 1], [rows + 1, 1]]
    assert staged.env["tiles"] == 3 and staged.arrays["seq_index"].tolist() == [1] * (rows + 1) + [0]
    limit = 6 * program.pool.block_size
    with pytest.raises(LlmcError, match=f"past the {limit} positions"):
        stage(abi.Batch(np.array([3]), np.array([limit]), np.array([0]), tables, np.array([0])).inputs(), program,
              width=6, blocks=20)


class RecordingDriver:
    """The driver calls the launcher makes, recorded; kernels do nothing and logits read as 0."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.top = 1 << 20

    def arch(self):
        return 8, 0

    def alloc(self, nbytes: int) -> int:
        address, self.top = self.top, self.top + -(-max(nbytes, 256) // 256) * 256
        return address

    def free(self, pointer: int) -> None:
        self.calls.append(("free", pointer))

    def upload(self, pointer: int, host: int, nbytes: int) -> None:
        self.calls.append(("upload", pointer, nbytes))

    def download(self, host: int, pointer: int, nbytes: int) -> None:
        ctypes.memset(host, 0, nbytes)

    def synchronize(self) -> None:
        pass

    def load_function(self, cubin: bytes, name: str, shared: int) -> str:
        return name

    def launch(self, function, grid, threads, shared, params) -> None:
        self.calls.append(("launch", function))

    def capture(self, launches) -> int:
        graph = sum(call[0] == "capture" for call in self.calls)
        self.calls.append(("capture", graph))
        launches()
        return graph

    def replay(self, graph) -> None:
        self.calls.append(("replay", graph))

    def destroy_graph(self, graph) -> None:
        self.calls.append(("destroy", graph))


def test_the_launcher_captures_a_decode_graph_per_bucket(llama_cuda, monkeypatch):
    """The launcher's side of a step on a driver that only records: decode batches of 3 and 4
    share the bucket of 4 (captured once, then replayed), 2 is a bucket of its own, any other
    batch launches kernel by kernel, and a new pool drops the graphs."""
    from llmc.targets.cuda import launch

    driver = RecordingDriver()
    monkeypatch.setattr(launch, "Driver", lambda: driver)
    executor = launch.CudaExecutor(read_artifact(llama_cuda))
    executor.allocate_pool(8)
    tables = np.arange(8, dtype=np.int64).reshape(4, 2)

    def decode(n: int) -> dict:
        every = np.arange(n, dtype=np.int64)
        return abi.Batch(every, np.full(n, 3, np.int64), every, tables, every).inputs()

    def graphs() -> list[tuple]:
        return [c for c in driver.calls if c[0] in ("capture", "replay", "destroy")]

    for n in (3, 4, 2, 3):
        assert executor.run(abi.STEP, decode(n)).shape == (n, 128)
    assert graphs() == [("capture", 0), ("replay", 0), ("replay", 0), ("capture", 1), ("replay", 1), ("replay", 0)]
    captured = driver.calls[driver.calls.index(("capture", 0)) + 1:driver.calls.index(("replay", 0))]
    assert len(captured) > 10 and {c[0] for c in captured} == {"launch"}       # the plan, recorded once
    driver.calls.clear()
    prompt = np.arange(5, dtype=np.int64)
    executor.run(abi.STEP, abi.Batch(prompt, prompt, np.zeros(5, np.int64), tables, np.array([4])).inputs())
    assert graphs() == [] and sum(c[0] == "launch" for c in driver.calls) > 10
    executor.allocate_pool(16)
    assert sorted(graphs()) == [("destroy", 0), ("destroy", 1)]
    assert executor.sample(abi.STEP, decode(1), SamplingParams(), 0) == 0


@pytest.mark.skipif(GPU is not None, reason=f"this machine has a GPU ({GPU}): loading succeeds")
def test_loading_without_a_gpu_is_a_clear_error(llama_cuda, capsys):
    from llmc.cli import main

    path = llama_cuda
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
        compile_model("no-such-model-dir", tmp_path / "m.llmc", target="cuda", act_dtype="f32", progress=None)
    with pytest.raises(LlmcError, match="int8"):
        compile_model("no-such-model-dir", tmp_path / "m.llmc", target="cuda", kv="int8", progress=None)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(vocab_size=512) or m["entry_points"]["step"].update(outputs=[["logits", "f32[rows, 512]"]]),
     "its vocabulary"),
    (lambda m: m["target"]["weights"].reverse(), "the weights it reads, in order"),
    (lambda m: m["target"].update(decode_batch=3), "its largest decode batch"),
    (lambda m: m["target"].update(max_tokens=4096, chunk=4096) or m["entry_points"]["step"].update(max_tokens=4096),
     "the most tokens a call takes"),
    (lambda m: m["target"].update(weight_dtypes=["bf16"] * len(m["target"]["weight_dtypes"])), "storage dtypes"),
    (lambda m: m["target"].update(weight_dtypes=None), "target.weight_dtypes must be a list"),
])
def test_a_manifest_edited_out_of_step_with_the_plans_is_refused(llama_cuda, tmp_path, edit, message):
    """Issue 17 on cuda: what the plans and kernels were built for is recorded in the plan section;
    verify and loading refuse a manifest that says otherwise, before anything is uploaded."""
    from llmc.artifact import read_artifact
    from llmc.verify import verify_artifact
    from manifest_fuzz import write_mutant

    manifest = read_artifact(llama_cuda, machine=False).manifest
    edit(manifest)
    path = tmp_path / "edited.llmc"
    assert write_mutant(llama_cuda.read_bytes(), manifest, path)
    assert verify_artifact(llama_cuda)["ok"]
    with pytest.raises(LlmcError, match=message):
        verify_artifact(path)
    with pytest.raises(LlmcError, match=message):
        emulated(path)
