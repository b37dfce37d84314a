"""Build files, reproducible builds, the build cache and its policies, verify, --json and exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llmc.artifact import host_cpu_features, read_artifact
from llmc.cli import main
from llmc.errors import UsageError

pytestmark = pytest.mark.slow          # whole builds from build files, several per test

LEVEL = "x86-64-v3" if {"avx2", "fma", "f16c"} <= host_cpu_features() else "portable"


def write_build_file(folder: Path, model: Path, artifacts: str, context: int = 64) -> Path:
    """A build file in ``folder`` naming ``model`` by a path relative to it."""
    path = folder / "llmc.toml"
    path.write_text(f'[model]\nsource = "{os.path.relpath(model, folder)}"\ncontext = {context}\n\n'
                    f'[build]\noutput_dir = "dist"\n\n{artifacts}')
    return path


CPU = f'[[artifact]]\nname = "tiny-cpu"\ntarget = "cpu"\ncpu_level = "{LEVEL}"\nquant = "q8"\n\n'
CUDA = '[[artifact]]\nname = "tiny-cuda"\ntarget = "cuda"\narch = ["sm_80"]\nquant = "q4g32"\n\n'


def run_build(build_file: Path, *args: str, capsys) -> tuple[int, dict]:
    code = main(["build", str(build_file), "--json", *args])
    captured = capsys.readouterr()
    assert captured.out, captured.err
    return code, json.loads(captured.out)


def cache_files(folder: Path) -> dict[str, int]:
    """Every file under the cache (apart from Triton's own) with its modification time."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and "triton" not in p.parts}


def test_two_builds_from_scratch_in_two_caches_are_byte_identical(family_dirs, tmp_path, monkeypatch, capsys):
    """The issue's check: every artifact of a build file, built from scratch twice (cold caches,
    cpu and cuda), is the same bytes; a warm rebuild is too, and finds everything in the cache."""
    build_file = write_build_file(tmp_path, family_dirs["llama"], CPU + CUDA)
    outputs = {}
    for run in ("a", "b"):
        monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / f"cache-{run}"))
        code, result = run_build(build_file, capsys=capsys)
        assert code == 0 and result["ok"]
        assert result["model"]["cache"] == {"import": {"hits": 0, "misses": 1}}
        outputs[run] = {a["name"]: Path(a["path"]).read_bytes() for a in result["artifacts"]}
        assert all(a["cache"][kind]["hits"] == 0 for a in result["artifacts"] for kind in a["cache"])
    assert outputs["a"].keys() == {"tiny-cpu", "tiny-cuda"}
    assert outputs["a"] == outputs["b"]
    code, warm = run_build(build_file, capsys=capsys)            # cache b, now warm
    assert code == 0 and warm["model"]["cache"] == {"import": {"hits": 1, "misses": 0}}
    for artifact in warm["artifacts"]:
        assert all(c["misses"] == 0 and c["hits"] > 0 for c in artifact["cache"].values()), artifact["cache"]
        assert Path(artifact["path"]).read_bytes() == outputs["a"][artifact["name"]]
    manifest = read_artifact(tmp_path / "dist" / "tiny-cpu.llmc").manifest
    assert manifest["model"]["source"] == os.path.relpath(family_dirs["llama"], tmp_path)   # as written
    assert manifest["options"]["context"] == 64 and manifest["model"]["max_seq"] == 64


def test_cache_policies(family_dirs, tmp_path, monkeypatch, capsys):
    build_file = write_build_file(tmp_path, family_dirs["qwen2"], CPU)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMC_CACHE_DIR", str(cache))
    artifact = tmp_path / "dist" / "tiny-cpu.llmc"

    def build(policy: str) -> dict:
        code, result = run_build(build_file, "--cache", policy, capsys=capsys)
        assert code == 0
        counts = dict(result["model"]["cache"], **result["artifacts"][0]["cache"])
        return {kind: (c["hits"], c["misses"]) for kind, c in counts.items()}

    assert build("off") == {"import": (0, 1), "cpu library": (0, 1)}
    assert not cache.exists()                                    # off stores nothing
    reference = artifact.read_bytes()
    assert build("readonly") == {"import": (0, 1), "cpu library": (0, 1)}
    assert not cache.exists()                                    # nor does readonly
    assert build("on") == {"import": (0, 1), "cpu library": (0, 1)}
    stored = cache_files(cache)
    assert any(name.startswith("import/") for name in stored) and any(name.endswith(".so") for name in stored)
    assert build("readonly") == {"import": (1, 0), "cpu library": (1, 0)}
    assert cache_files(cache) == stored                          # used, untouched
    assert build("refresh") == {"import": (0, 1), "cpu library": (0, 1)}
    refreshed = cache_files(cache)
    assert refreshed.keys() == stored.keys() and all(refreshed[k] != stored[k] for k in stored)
    assert build("on") == {"import": (1, 0), "cpu library": (1, 0)}
    assert artifact.read_bytes() == reference                    # every policy builds the same bytes


def test_a_damaged_import_entry_is_rebuilt_not_used(family_dirs, tmp_path, monkeypatch, capsys):
    build_file = write_build_file(tmp_path, family_dirs["gpt2"], CPU.replace('"q8"', '"f32"'))
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    run_build(build_file, capsys=capsys)
    reference = (tmp_path / "dist" / "tiny-cpu.llmc").read_bytes()
    (entry,) = (tmp_path / "cache" / "import").glob("*.llmc")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF                                 # a flipped bit in the weights
    entry.write_bytes(bytes(data))
    code, result = run_build(build_file, capsys=capsys)
    assert code == 0 and result["model"]["cache"] == {"import": {"hits": 0, "misses": 1}}
    assert (tmp_path / "dist" / "tiny-cpu.llmc").read_bytes() == reference
    code, result = run_build(build_file, capsys=capsys)          # stored again, whole
    assert result["model"]["cache"] == {"import": {"hits": 1, "misses": 0}}


@pytest.mark.filterwarnings("ignore::llmc.LlmcWarning")          # the tiny models have no tokenizer
def test_the_import_key_covers_what_decides_the_graph(family_dirs, tmp_path):
    import shutil

    from llmc.frontend.sources import resolve
    from llmc.frontend.stored import import_key

    source = resolve(family_dirs["llama"])
    key = import_key(source, None, 64)
    assert key == import_key(resolve(family_dirs["llama"]), None, 64)
    assert key != import_key(source, None, 128) != import_key(source, "eager", 64)
    changed = tmp_path / "changed"
    shutil.copytree(family_dirs["llama"], changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps(dict(config, rms_norm_eps=1e-5)))
    assert import_key(resolve(changed), None, 64) != key
    assert import_key(resolve(tiny_module()), None, 64) is None   # an in-memory module: never cached


def tiny_module():
    from conftest import tiny_model

    return tiny_model("llama")


def test_build_file_mistakes_are_usage_errors(family_dirs, tmp_path, capsys):
    model = family_dirs["llama"]
    cases = {
        "": "lists no artifacts",
        '[[artifact]]\nname = "x"\ntarget = "cpu"\nquant = "q5"\n': "artifact 1 (x): unknown quantization scheme 'q5'",
        '[[artifact]]\nname = "x"\ntarget = "tpu"\n': "unknown target 'tpu'",
        '[[artifact]]\nname = "x"\ntarget = "cpu"\narchs = ["sm_80"]\n': "unknown key 'archs'",
        '[[artifact]]\nname = "x"\ntarget = "cuda"\narch = ["sm_70"]\n': "unknown cuda arch 'sm_70'",
        '[[artifact]]\nname = "x"\ntarget = "cpu"\nchunk = "big"\n': "chunk must be an integer, not 'big'",
        '[[artifact]]\nname = "x"\ntarget = "cpu"\n[[artifact]]\nname = "x"\ntarget = "ref"\n': "x is used twice",
        '[[artifact]]\nname = "m"\ntarget = "cpu"\nquant = ["q8", "f16"]\n': "the name must hold {quant}",
        '[[artifact]]\nname = "../m"\ntarget = "cpu"\n': "must be letters, digits",
        '[[artifact]]\nname = "x"\ntarget = "cpu"\n': None,          # fine, but --only names no artifact
    }
    for body, message in cases.items():
        build_file = write_build_file(tmp_path, model, body)
        code = main(["build", str(build_file), "--only", "nothing"] if message is None else ["build", str(build_file)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, body
        assert len(err) == 1 and err[0].startswith("error: ") and (message or "has no artifact 'nothing'") in err[0], err
        assert not (tmp_path / "dist").exists()                  # nothing was built
    (tmp_path / "llmc.toml").write_text("[model\nsource=")
    assert main(["build", str(tmp_path / "llmc.toml")]) == 2 and "not valid TOML" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "missing.toml"), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["exit_code"] == 2 and "no build file" in out["error"]


def test_quant_lists_expand_into_one_artifact_per_scheme(family_dirs, tmp_path):
    from llmc.build import read_build_file

    build_file = write_build_file(tmp_path, family_dirs["llama"],
                                  '[[artifact]]\nname = "m-{quant}"\ntarget = "cpu"\nquant = ["q8", "q4g32"]\n'
                                  'calib = "notes.txt"\n')
    spec = read_build_file(build_file)
    assert [(a.name, a.options["quant"]) for a in spec.artifacts] == [("m-q8", "q8"), ("m-q4g32", "q4g32")]
    assert spec.artifacts[0].output == tmp_path / "dist" / "m-q8.llmc"
    assert spec.artifacts[0].options["calib"] == str(tmp_path / "notes.txt")     # relative to the build file
    with pytest.raises(UsageError):
        read_build_file(tmp_path / "nope.toml")


def test_a_failed_artifact_does_not_stop_the_others(family_dirs, tmp_path, capsys, monkeypatch):
    """q4g128 cannot group the tiny model's 64 inputs: that artifact fails (exit 1), the other is built."""
    build_file = write_build_file(tmp_path, family_dirs["llama"],
                                  '[[artifact]]\nname = "bad"\ntarget = "ref"\nquant = "q4g128"\n\n'
                                  '[[artifact]]\nname = "good"\ntarget = "ref"\n')
    code = main(["build", str(build_file)])
    captured = capsys.readouterr()
    assert code == 1
    assert "failed: bad: scheme q4g128 groups 128 weights" in captured.err
    assert "1 of 2 artifacts built" in captured.err and "Traceback" not in captured.err
    assert (tmp_path / "dist" / "good.llmc").is_file() and not (tmp_path / "dist" / "bad.llmc").exists()


def test_compile_json_and_exit_codes(family_dirs, tmp_path, capsys):
    out = tmp_path / "m.llmc"
    assert main(["compile", str(family_dirs["llama"]), "-o", str(out), "--target", "ref", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["path"] == str(out) and report["bytes"] == out.stat().st_size
    assert len(report["sha256"]) == 64 and "import" in report["cache"]
    assert main(["compile", str(family_dirs["llama"]), "-o", str(out), "--quant", "q5"]) == 2
    assert main(["compile", str(tmp_path / "no-model"), "-o", str(out)]) == 1
    assert main(["compile", str(family_dirs["llama"]), "-o", str(out), "--context", "0"]) == 2
    with pytest.raises(SystemExit) as exit_:
        main(["compile", str(family_dirs["llama"]), "-o", str(out), "--target", "tpu"])   # argparse
    assert exit_.value.code == 2
    capsys.readouterr()


def test_verify_reports_what_an_artifact_was_built_from(family_dirs, tmp_path, capsys):
    out = tmp_path / "m.llmc"
    main(["compile", str(family_dirs["phi3"]), "-o", str(out), "--cpu-level", LEVEL, "--quant", "q8"])
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    text = capsys.readouterr().out
    digest = read_artifact(out).manifest["inputs"]["model.safetensors"]
    assert f"input     model.safetensors sha256 {digest}" in text
    assert f"cpu       level {LEVEL}, up to 512 tokens a call" in text and "llmc 0.1.0" in text
    assert "quant     q8, KV cache f16 in blocks of 16, up to 512 tokens a step" in text      # the default KV
    assert main(["verify", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["runs_here"] is True and result["options"]["quant"] == "q8"
    assert set(result["sections"]) >= {"code", "weights", "graph"}
    data = bytearray(out.read_bytes())
    data[-5000] ^= 1
    bad = tmp_path / "bad.llmc"
    bad.write_bytes(bytes(data))
    assert main(["verify", str(out), str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("ok ") and captured.err.count("\n") == 1
    assert "bad.llmc is corrupt: section 'weights' does not match its checksum" in captured.err
    assert main(["verify", str(bad), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_verify_reports_artifacts_for_other_machines(family_dirs, tmp_path, capsys, monkeypatch):
    """A CI runner verifies what it cannot run: here, an AVX2 build on a machine without AVX2."""
    out = tmp_path / "m.llmc"
    assert main(["compile", str(family_dirs["llama"]), "-o", str(out), "--cpu-level", "portable"]) == 0
    assert main(["compile", str(family_dirs["llama"]), "-o", str(tmp_path / "v3.llmc"), "--cpu-level", LEVEL]) == 0
    capsys.readouterr()
    monkeypatch.setattr("llmc.artifact.host_cpu_features", lambda: {"sse2"})
    assert main(["verify", str(out)]) == 0
    assert "; runs here" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "v3.llmc")]) == 0
    assert ("NOT on this machine" if LEVEL != "portable" else "; runs here") in capsys.readouterr().out


def test_cache_command_shows_and_clears(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "c"))
    (tmp_path / "c" / "import").mkdir(parents=True)
    (tmp_path / "c" / "import" / "x.llmc").write_bytes(b"0" * 1000)
    assert main(["cache", "--json"]) == 0
    parts = {p["what"]: p for p in json.loads(capsys.readouterr().out)["parts"]}
    assert parts["imported models"]["files"] == 1 and parts["imported models"]["bytes"] == 1000
    assert main(["cache", "--clear"]) == 0 and not (tmp_path / "c").exists()
