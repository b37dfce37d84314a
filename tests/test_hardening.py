"""Issue 17: a manifest is validated before native code runs, the library is loaded only from a
safe place, files are written with the umask's mode and never left half-written. (Bad values a
caller gives are tested in test_runtime.py and test_cli.py; a Model shared by threads too.)"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from llmc.artifact import ArtifactError, read_artifact, write_artifact
from manifest_fuzz import run_child, write_mutant

HERE = Path(__file__).parent


def edited(artifact: Path, folder: Path, edit) -> Path:
    """A copy of ``artifact`` whose manifest ``edit`` changed in place, its digest recomputed."""
    manifest = read_artifact(artifact, machine=False).manifest
    edit(manifest)
    path = folder / "edited.llmc"
    assert write_mutant(artifact.read_bytes(), manifest, path)
    return path


def _swap_tensor_offsets(m, a, b):
    m["tensors"][a]["offset"], m["tensors"][b]["offset"] = m["tensors"][b]["offset"], m["tensors"][a]["offset"]


def _smaller_pool(m):
    """Every KV declaration edited consistently to heads of 8 values instead of 16."""
    def shrink(text):
        return text.replace(", 16]", ", 8]")
    m["kv_pool"]["head_dim"] = 8
    m["kv_pool"]["tensors"] = [[n, shrink(t)] for n, t in m["kv_pool"]["tensors"]]
    m["kv_pool"]["bytes_per_block"] //= 2
    m["entry_points"]["step"]["inputs"] = [[n, shrink(t)] for n, t in m["entry_points"]["step"]["inputs"]]


def _f32_pool(m):
    """The pool's f16 tensors declared f32 (twice the bytes the code writes into)."""
    m["kv_pool"]["tensors"] = [[n, t.replace("f16", "f32")] for n, t in m["kv_pool"]["tensors"]]
    m["kv_pool"]["dtype"] = "f32"
    m["kv_pool"]["bytes_per_block"] *= 2
    step = m["entry_points"]["step"]
    step["inputs"] = [[n, t.replace("f16", "f32")] for n, t in step["inputs"]]


def _reorder(m):
    names = m["target"]["weights"]
    names[-1], names[-2] = names[-2], names[-1]


# What the fuzzing found: crashes (arena, vocabulary, pool, weight table, entry function)
# and silently wrong tokens (offsets, order), each edited the way a JSON tool would.
EDITS = {
    "arena of 0 bytes": (lambda m: m["target"].update(arena_bytes=0), "activation arena"),
    "arena of 64 bytes": (lambda m: m["target"].update(arena_bytes=64), "activation arena"),
    "vocabulary larger than the weights": (lambda m: (m.update(vocab_size=4096), m["entry_points"]["step"].update(
        outputs=[["logits", "f32[rows, 4096]"]])), "its vocabulary"),
    "vocabulary smaller": (lambda m: (m.update(vocab_size=128), m["entry_points"]["step"].update(
        outputs=[["logits", "f32[rows, 128]"]])), "its vocabulary"),
    "smaller KV shapes": (_smaller_pool, "KV pool"),
    "KV pool of another dtype": (_f32_pool, "KV pool"),
    "a dropped cache input": (lambda m: m["entry_points"]["step"]["inputs"].pop(), "takes"),
    "an empty weight table": (lambda m: m["target"].update(weights=[]), "the weights it reads"),
    "a swapped entry function": (lambda m: m["target"]["functions"].update(step="llmc_stream_read"),
                                 "entry functions"),
    "an unknown entry function": (lambda m: m["target"]["functions"].update(step="nope"), "entry functions"),
    "a misaligned tensor offset": (lambda m: m["tensors"]["model.norm.weight"].update(
        offset=m["tensors"]["model.norm.weight"]["offset"] + 4), "multiple of 64"),
    "a negative tensor offset": (lambda m: m["tensors"]["model.norm.weight"].update(offset=-64), "from 0"),
    "a tensor past its section": (lambda m: m["tensors"]["lm_head.weight"].update(offset=10 ** 9), "lm_head.weight.offset must be"),
    "a reordered weight table": (_reorder, "the weights it reads, in order"),
    "swapped offsets of two tensors of one size": (lambda m: _swap_tensor_offsets(
        m, "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"), "out of place"),
    "a tensor's shape": (lambda m: m["tensors"]["model.norm.weight"].update(shape=[32]), "nbytes must be 128"),
    "a shape and size that agree but not with the code": (lambda m: m["tensors"]["model.norm.weight"].update(
        shape=[32], nbytes=128), "weight model.norm.weight"),
    "a section past the end": (lambda m: m["sections"]["code"].update(offset=m["sections"]["code"]["offset"] + 8),
                               "multiple of 4096"),
    "a chunk larger than the arena's": (lambda m: (m["target"].update(chunk=64), m["entry_points"]["step"].update(
        max_tokens=64)), "the most tokens a call takes"),
    "an end token that is not an id": (lambda m: m.update(eos_token_ids=["2"]), "eos_token_ids.0"),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_a_manifest_edited_out_of_step_with_the_code_is_refused_before_it_runs(chat_artifact, tmp_path, name):
    """Loading and ``llmc verify`` both refuse each edit with an ArtifactError naming what is wrong
    (before: a segfault, heap corruption, a plain exception or wrong tokens); each runs in a
    forked child, so a crash fails the test instead of ending it."""
    edit, message = EDITS[name]
    path = edited(chat_artifact, tmp_path, edit)
    outcome = run_child(path)
    assert outcome["end"] == "exit", outcome
    for step in ("verify", "load"):
        kind, said = outcome[step]
        assert kind == "refused", (step, outcome[step])
        assert message in said, (step, said)


def test_an_unedited_artifact_passes_every_check(chat_artifact):
    outcome = run_child(chat_artifact)
    assert outcome["verify"] == ("ok", True)
    assert outcome["load"][0] == "ok"


def test_the_library_checks_the_buffers_it_is_given(chat_artifact):
    """Beyond the manifest's checks, the cpu library compares each buffer's size with what it was
    built for (llmc_check_buffers) before the first step: the same sizes pass, any short one fails."""
    import ctypes

    import llmc

    executor = llmc.load(chat_artifact, max_context=64).executor
    weights = [w.nbytes for w in executor._keep]
    blocks = [a.nbytes // executor.blocks for a in executor.pool]
    arena = executor.arena.nbytes - 64

    def check(weights, blocks, arena, vocab):
        w = (ctypes.c_int64 * len(weights))(*weights)
        b = (ctypes.c_int64 * len(blocks))(*blocks)
        return executor.lib.llmc_check_buffers(len(weights), w, len(blocks), b, arena, vocab)

    assert check(weights, blocks, arena, 256) == 0
    assert check(weights[:-1], blocks, arena, 256) == 1
    assert check(weights[:3] + [weights[3] - 1] + weights[4:], blocks, arena, 256) == 1
    assert check(weights, [blocks[0] // 2] + blocks[1:], arena, 256) == 1
    assert check(weights, blocks[:1], arena, 256) == 1
    assert check(weights, blocks, arena - 64, 256) == 1
    assert check(weights, blocks, arena, 257) == 1


def _fuzz(artifact: Path, mutants: int, seed: int) -> dict:
    done = subprocess.run([sys.executable, str(HERE / "manifest_fuzz.py"), str(artifact), "--mutants", str(mutants),
                           "--seed", str(seed), "--json"], capture_output=True, text=True, timeout=600)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == (1 if result["findings"] else 0), done.stderr
    return result


@pytest.mark.slow                   # 17 s: CI runs it, the fast loop runs the named edits above
def test_a_few_hundred_mutated_manifests_are_refused_or_run_correctly(chat_artifact):
    """The bounded fuzzer (tests/manifest_fuzz.py): each mutant is refused with an LlmcError by
    both verify and load, or runs with the original's logits; never a signal, another exception
    or a hang. Before: 11 of 147 crashed the process and 63 raised plain exceptions."""
    result = _fuzz(chat_artifact, 300, 17)
    assert result["findings"] == []
    assert result["refused"] > 100 and result["same"] > 20     # both outcomes are exercised


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(target="ref", block_size=4), dict(target="cpu", quant="q8", kv="int8",
                                                                            block_size=4, chunk=32)])
def test_the_fuzzer_finds_nothing_on_other_targets_and_formats(chat_artifact, tmp_path, options):
    from llmc.compiler import compile_model

    path = tmp_path / "other.llmc"
    compile_model(str(chat_artifact.parent / "hf"), path, progress=None, **options)
    result = _fuzz(path, 120, 5)
    assert result["findings"] == []


# -- the compiled library's location ----------------------------------------------------------

@pytest.fixture
def code(chat_artifact):
    return bytes(read_artifact(chat_artifact).section("code"))


def _isolated(monkeypatch, tmp_path, cache: Path):
    import tempfile

    from llmc.targets.cpu import launch

    monkeypatch.setenv("LLMC_CACHE_DIR", str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(launch, "_LOADED", {})
    return tmp_path / "tmp" / f"llmc-{os.getuid()}"


def test_the_library_is_never_taken_from_a_folder_others_may_write(code, tmp_path, monkeypatch):
    """With the cache unusable, the fallback $TMPDIR/llmc-<uid> made by someone else with mode
    0777 (where they could swap the file before dlopen) is passed over: the library is loaded
    from memory, and what was planted there is neither loaded nor replaced."""
    from llmc.targets.cpu import ABI_VERSION
    from llmc.targets.cpu.launch import load_library

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    fallback = _isolated(monkeypatch, tmp_path, blocked / "cache")      # a cache under a file: unusable
    fallback.mkdir(mode=0o777)
    os.chmod(fallback, 0o777)
    import hashlib

    planted = fallback / f"{hashlib.sha256(code).hexdigest()}.so"
    planted.write_bytes(b"not the library")
    lib = load_library(code)
    assert lib.llmc_abi() == ABI_VERSION
    assert planted.read_bytes() == b"not the library"


def test_a_library_file_whose_bytes_differ_is_replaced_not_loaded(code, tmp_path, monkeypatch):
    import hashlib

    from llmc.targets.cpu import ABI_VERSION
    from llmc.targets.cpu.launch import load_library

    _isolated(monkeypatch, tmp_path, tmp_path / "cache")
    folder = tmp_path / "cache" / "cpu" / "lib"
    folder.mkdir(parents=True, mode=0o700)
    planted = folder / f"{hashlib.sha256(code).hexdigest()}.so"
    planted.write_bytes(b"\x7fELF not the library")
    lib = load_library(code)
    assert lib.llmc_abi() == ABI_VERSION
    assert planted.read_bytes() == code
    assert stat.S_IMODE(os.stat(folder).st_mode) & 0o022 == 0


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_a_folder_another_user_owns_is_passed_over(code, tmp_path, monkeypatch):
    from llmc.targets.cpu import ABI_VERSION
    from llmc.targets.cpu.launch import load_library

    fallback = _isolated(monkeypatch, tmp_path, tmp_path / "file" / "cache")
    (tmp_path / "file").write_text("")
    fallback.mkdir(mode=0o700)
    os.chown(fallback, 12345, 12345)
    assert load_library(code).llmc_abi() == ABI_VERSION
    assert list(fallback.iterdir()) == []


# -- files -------------------------------------------------------------------------------------

def _write(path: Path):
    import numpy as np

    write_artifact(path, {"kind": "test"}, {"notes": b"hello"}, {"w": np.ones(4, np.float32)})


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_an_artifact_has_the_mode_the_umask_gives(tmp_path, umask, mode):
    path = tmp_path / "a.llmc"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    before = os.umask(umask)
    try:
        _write(path)
    finally:
        os.umask(before)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert read_artifact(path, machine=False).manifest["kind"] == "test"


def test_a_temporary_file_a_killed_writer_left_is_removed_by_the_next_write(tmp_path):
    """A stale ``.NAME.*.partial`` (its writer died) goes; one a live writer holds locked stays."""
    import fcntl

    stale = tmp_path / ".a.llmc.x1y2.partial"
    stale.write_bytes(b"\0" * 4096)
    live = tmp_path / ".a.llmc.z3w4.partial"
    live.write_bytes(b"\0" * 4096)
    other = tmp_path / ".b.llmc.q5r6.partial"
    other.write_bytes(b"")
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        _write(tmp_path / "a.llmc")
        assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".a.llmc.z3w4.partial", ".b.llmc.q5r6.partial",
                                                                 "a.llmc"])


def test_a_fifo_is_refused_as_an_artifact_and_as_an_output(tmp_path, chat_artifact):
    """Reading a FIFO used to wait forever for a writer; writing one replaced it after the work."""
    from llmc.compiler import compile_model

    fifo = tmp_path / "pipe.llmc"
    os.mkfifo(fifo)
    with pytest.raises(ArtifactError, match="is a FIFO, not an llmc artifact"):
        read_artifact(fifo)
    with pytest.raises(ArtifactError, match="it is a FIFO; name a file"):
        compile_model("no-such-model-source", fifo, progress=None)
    with pytest.raises(ArtifactError, match="it is a folder"):
        compile_model("no-such-model-source", tmp_path, progress=None)


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_a_compile_ended_by_a_signal_leaves_no_temporary_file(chat_artifact, tmp_path, signal_name):
    """The signal arrives while the artifact's temporary file is complete but not yet renamed
    (the worst moment: the whole artifact on disk); the CLI removes it and exits 128 + signal."""
    import signal

    script = f"""
import os, signal, sys
import llmc.artifact as artifact
from llmc.cli import main
real = artifact.os.replace
def replace(src, dst):
    os.kill(os.getpid(), signal.{signal_name})
    real(src, dst)
artifact.os.replace = replace
sys.exit(main(["compile", {str(chat_artifact.parent / 'hf')!r}, "-o", {str(tmp_path / 'out.llmc')!r},
               "--target", "ref", "--cache", "off"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 128 + getattr(signal, signal_name), done.stderr
    assert f"terminated by {signal_name}" in done.stderr
    assert list(tmp_path.iterdir()) == []
