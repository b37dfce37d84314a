"""The target registry and the layering it keeps: a new target is a package plus one register
line (shown with a dummy target compiled, inspected, verified and run through the public
registry), no file outside targets/ names a target, and the core and the runtime import nothing
above them."""

import ast
import dataclasses
import subprocess
import sys
import tokenize
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_model
from llmc import targets

import llmc

ROOT = Path(__file__).resolve().parent.parent


def make_dummy_package():
    """A target that keeps the step graph as its own section and runs it with the interpreter over
    a host pool: everything a real target provides, in a few lines."""
    from llmc.targets import Build

    package = types.ModuleType("llmc_dummy_target")

    @dataclasses.dataclass(frozen=True)
    class Options:
        greeting: str = dataclasses.field(default="hello", metadata={"help": "what the dummy says",
                                                                     "choices": ["hello", "hi"]})

    def check(options):
        if options.greeting not in ("hello", "hi"):
            raise llmc.UsageError(f"the dummy target does not say {options.greeting!r}")

    def emit(graph, options, progress=None):
        return Build({"dummy_ir": str(graph).encode()}, {"name": "dummy", "executor": "a test's interpreter",
                                                         "greeting": options.greeting}, 8,
                     summary=f"{options.greeting}, {len(graph.nodes())} nodes")

    def describe(artifact):
        return [f"dummy     says {artifact.manifest['target']['greeting']}"]

    def runs_here(manifest):
        return True, None

    class Executor:
        def __init__(self, artifact, threads):
            from llmc.ir import parse_graph

            self.artifact = artifact
            self.graph = parse_graph(bytes(artifact.section("dummy_ir")).decode(), artifact.weights())
            self.calls = 0

        def allocate_pool(self, blocks):
            self.pool = targets.pool_arrays(self.artifact, blocks)
            return sum(a.nbytes for a in self.pool)

        def run(self, entry, inputs):
            from llmc.interpret import run

            self.calls += 1
            return run(self.graph, list(inputs.values()) + self.pool)[0]

    package.__dict__.update(Options=Options, check=check, emit=emit, describe=describe, runs_here=runs_here,
                            executor=lambda artifact, threads: Executor(artifact, threads))
    return package


@pytest.fixture
def dummy(monkeypatch):
    monkeypatch.setitem(sys.modules, "llmc_dummy_target", make_dummy_package())
    monkeypatch.setitem(targets.REGISTRY, "dummy", targets.Target("dummy", "a test target", "llmc_dummy_target"))
    yield


def test_a_registered_target_compiles_inspects_verifies_and_runs(dummy, tmp_path, capsys):
    from llmc.cli import main

    model = tiny_model("llama")
    dirs = tmp_path / "model"
    model.save_pretrained(dirs)
    out, ref = tmp_path / "d.llmc", tmp_path / "r.llmc"
    assert main(["compile", str(dirs), "-o", str(out), "--target", "dummy", "--greeting", "hi"]) == 0
    assert "dummy hi, " in capsys.readouterr().out
    assert main(["compile", str(dirs), "-o", str(ref), "--target", "ref"]) == 0
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "target    dummy: a test's interpreter" in shown and "dummy     says hi" in shown
    assert "(at most 8 tokens a call)" in shown
    assert main(["verify", str(out)]) == 0 and "; runs here" in capsys.readouterr().out
    loaded = llmc.load(out)
    ids = list(range(3, 23))                      # 20 tokens: three steps of at most 8
    np.testing.assert_allclose(loaded.logits(ids), llmc.load(ref).logits(ids), rtol=1e-6, atol=1e-6)
    assert loaded.executor.calls == 3
    assert loaded.generate(ids, max_new_tokens=5) == llmc.load(ref).generate(ids, max_new_tokens=5)
    # An option of another target, or a value the dummy refuses, is a usage error before any work.
    assert main(["compile", str(dirs), "-o", str(out), "--target", "dummy", "--cpu-level", "portable"]) == 2
    assert "target dummy takes no option cpu_level (cpu_level is an option of cpu)" in capsys.readouterr().err
    with pytest.raises(llmc.UsageError, match="does not say 'hey'"):
        llmc.compiler.compile_model(dirs, out, target="dummy", greeting="hey", progress=None)


def test_an_unknown_target_is_named_with_the_ones_there_are(tmp_path):
    from llmc.compiler import compile_model

    with pytest.raises(llmc.UsageError, match="unknown target 'tpu'; this llmc builds: cpu, cuda, ref, onnx"):
        compile_model("smollm2", tmp_path / "x.llmc", target="tpu", progress=None)


def target_names_in(path: Path) -> list[str]:
    """String literals in a Python file that are a registered target's name."""
    names = set(targets.REGISTRY)
    found = []
    with open(path, "rb") as f:
        for token in tokenize.tokenize(f.readline):
            if token.type == tokenize.STRING:
                try:
                    value = ast.literal_eval(token.string)
                except (SyntaxError, ValueError):       # an f-string
                    continue
                if value in names:
                    found.append(f"{path.relative_to(ROOT)}:{token.start[0]} {token.string}")
    return found


def test_no_file_outside_targets_names_a_target():
    files = sorted(p for folder in ("llmc", "passes") for p in (ROOT / folder).rglob("*.py"))
    assert len(files) > 20
    assert [hit for path in files for hit in target_names_in(path)] == []
    assert target_names_in(ROOT / "targets" / "__init__.py")          # the check does see names


def imported_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


ABOVE_CORE = ("llmc.frontend", "llmc.passes", "llmc.pipeline", "llmc.compiler", "llmc.build", "llmc.runtime",
              "llmc.targets", "llmc.cli", "llmc.interpret", "llmc.cache")
HEAVY = ("torch", "transformers", "triton")


@pytest.mark.parametrize("module", ["llmc.dims", "llmc.types", "llmc.ops", "llmc.ir", "llmc.abi", "llmc.artifact"])
def test_the_core_imports_nothing_above_it(module):
    loaded = imported_after(f"import {module}")
    above = sorted(m for m in loaded if m.startswith(ABOVE_CORE) or m.split(".")[0] in HEAVY)
    assert above == []
    if module in ("llmc.types", "llmc.dims"):
        assert "llmc.ir" not in loaded and "llmc.ops" not in loaded
    if module == "llmc.ops":
        assert "llmc.ir" not in loaded                              # ops stands on types, not on the graph


def test_the_runtime_runs_an_artifact_without_the_compiler(tmp_path):
    from llmc.compiler import compile_model

    path = tmp_path / "t.llmc"
    compile_model(tiny_model("qwen2"), path, progress=None)
    loaded = imported_after(f"import llmc\nm = llmc.load({str(path)!r})\nm.generate([1, 2, 3], max_new_tokens=3)")
    compiler = sorted(m for m in loaded if m.startswith(("llmc.frontend", "llmc.passes", "llmc.pipeline",
                                                           "llmc.compiler", "llmc.build")))
    assert compiler == [] and not [m for m in loaded if m.split(".")[0] in HEAVY]
    assert not [m for m in loaded if m.startswith("llmc.targets.") and m.split(".")[-1] in ("lower", "build", "tune")]
