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
    compile_model(model, path, progress=None)
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
