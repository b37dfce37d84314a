"""The llmc command: useful output on good sources, one clear line and exit 1 on bad ones (2 on
options it does not take)."""

import json
import subprocess
import sys
import textwrap

import pytest
import transformers


def llmc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmc", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def assert_one_line_error(result, *fragments, code=1):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if not ln.startswith(("warning: ", "note: ", "["))]   # progress is not an error
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


@pytest.mark.slow
def test_inspect_prints_histogram_and_ir(family_dirs):
    result = llmc("inspect", family_dirs["gemma"], "--ir")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "op histogram after import:" in out and "graph @forward(%input_ids: i64[1, seq]) {" in out
    assert out.index("op histogram") < out.index("graph @forward")
    assert "gelu" in out and "tokenizer none" in out
    stderr = result.stderr.splitlines()
    assert [ln for ln in stderr if ln.startswith("warning: ")] == [ln for ln in stderr if "no tokenizer files" in ln]
    assert [ln.split()[0] for ln in stderr if ln.startswith("[")] == ["[1/1]"]


def test_missing_path():
    assert_one_line_error(llmc("inspect", "/no/such/model"), "no such file or directory: /no/such/model")


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\x01" * 20)
    assert_one_line_error(llmc("inspect", path), "broken.gguf", "GGUF")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("hello")
    assert_one_line_error(llmc("inspect", path), "not a GGUF file")


def test_encoder_only_bert_is_refused(tmp_path):
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=48)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path)
    result = llmc("inspect", tmp_path)
    assert_one_line_error(result, "BertForMaskedLM", "decoder-only")
    assert "warning" not in result.stderr          # refused before anything else is looked at


@pytest.mark.slow
def test_encoder_without_architectures_is_caught_by_the_causality_probe(tmp_path):
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=48)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert_one_line_error(llmc("inspect", tmp_path), "not a causal language model")


MODULES = textwrap.dedent('''
    import torch

    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(32, 8)

        def forward(self, ids):
            h = self.embed(ids)
            if ids[0, 0] > 5:  # branches on a value (causal, but not traceable)
                h = h * 2
            return h

    class UnknownOp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(32, 8)

        def forward(self, ids):
            return torch.cumprod(self.embed(ids), dim=1)

    def data_dependent():
        return DataDependent()

    def unknown_op():
        return UnknownOp()
''')


@pytest.fixture
def modules_file(tmp_path):
    path = tmp_path / "mymodels.py"
    path.write_text(MODULES)
    return path


def line_of(code: str) -> int:
    return MODULES.splitlines().index(next(ln for ln in MODULES.splitlines() if code in ln)) + 1


@pytest.mark.slow
def test_untraceable_model_names_the_line(modules_file):
    result = llmc("inspect", f"{modules_file}:data_dependent")
    assert_one_line_error(result, "torch.export could not trace",
                          f"mymodels.py:{line_of('if ids[0, 0] > 5')}", "if ids[0, 0] > 5")


@pytest.mark.slow
def test_unknown_aten_op_names_the_op_and_line(modules_file):
    result = llmc("inspect", f"{modules_file}:unknown_op")
    assert_one_line_error(result, "aten.cumprod", f"mymodels.py:{line_of('torch.cumprod')}", "torch.cumprod")


def test_bad_factory_specs(modules_file):
    assert_one_line_error(llmc("inspect", f"{modules_file}:nothing_here"), "no attribute 'nothing_here'")
    assert_one_line_error(llmc("inspect", "no_such_package_xyz:make"), "cannot import no_such_package_xyz")


def test_usage_error_exits_2():
    result = llmc("inspect")
    assert result.returncode == 2


def test_runtime_modules_never_import_torch():
    code = ("import sys, llmc, llmc.ir, llmc.ops, llmc.interpret, llmc.dims, llmc.errors, llmc.cli; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_compile_writes_an_artifact_that_runs(family_dirs, tmp_path):
    out = tmp_path / "tiny.llmc"
    result = llmc("compile", family_dirs["mistral"], "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out} (") and "for target cpu" in result.stdout
    assert [ln.split()[:2] for ln in result.stderr.splitlines() if ln.startswith("[")] == \
        [["[1/6]", "import"], ["[2/6]", "simplify"], ["[3/6]", "attention"], ["[4/6]", "fuse"],
         ["[5/6]", "quantize"], ["[6/6]", "lower"]]
    assert "kernels: embedding x2" in result.stdout
    # No tokenizer in the directory: a text prompt is a clear error, not a crash.
    assert_one_line_error(llmc("run", out, "hello"), "no tokenizer")
    missing = llmc("compile", family_dirs["mistral"], "-o", tmp_path / "no" / "x.llmc")
    assert_one_line_error(missing, "does not exist")
    assert "[1/" not in missing.stderr                      # refused before any work
    assert_one_line_error(llmc("compile", family_dirs["mistral"], "-o", out, "--quant", "q5"),
                          "valid schemes: f32, f16, q8, q4g32, q4g128", code=2)      # a usage error


def test_bad_values_on_the_command_line_are_one_line_and_exit_2(chat_artifact, tmp_path):
    """Issue 17: values the user got wrong are usage errors, never "internal error"."""
    assert_one_line_error(llmc("run", chat_artifact, "hi", "--seed", "-1"), "seed must be an int", code=2)
    assert_one_line_error(llmc("run", chat_artifact, "hi", "--max-new-tokens", "0"),
                          "max_new_tokens must be an int >= 1, not 0", code=2)
    text = tmp_path / "text.txt"
    text.write_text("some words to read, and some more words " * 8)
    assert_one_line_error(llmc("eval", chat_artifact, "--text", text, "--stride", "0"),
                          "need 1 <= stride <= context", "got stride 0", code=2)
    # a prompt that is not UTF-8 (Python gives it to llmc as a lone surrogate)
    bad = subprocess.run([sys.executable.encode(), b"-m", b"llmc", b"run", str(chat_artifact).encode(), b"a\xffb"],
                         capture_output=True, text=True, timeout=600)
    assert_one_line_error(bad, "not valid Unicode", code=2)


@pytest.mark.slow
def test_a_context_beyond_the_model_s_positions_is_refused(family_dirs, tmp_path):
    config = json.loads((family_dirs["llama"] / "config.json").read_text())
    positions = config["max_position_embeddings"]
    result = llmc("compile", family_dirs["llama"], "-o", tmp_path / "x.llmc", "--context", positions + 1)
    assert_one_line_error(result, f"--context {positions + 1} is beyond the {positions} positions", code=2)
    assert not (tmp_path / "x.llmc").exists()
