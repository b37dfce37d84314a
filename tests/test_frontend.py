"""Traced-and-imported graphs, run by the interpreter, against transformers fp32 logits."""

import numpy as np
import pytest
import torch
import transformers

from conftest import FAMILIES, relative_error, tiny_model
from llmc.frontend import import_model
from llmc.interpret import run
from llmc.ir import parse_graph, print_graph, verify

LENGTHS = [1, 7, 67]  # 67: odd, > 64, and past Mistral's sliding window of 16


def check_against_transformers(imported, model, vocab, lengths=LENGTHS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for length in lengths:
        ids = torch.randint(0, vocab, (1, length), generator=generator)
        with torch.no_grad():
            want = model(input_ids=ids).logits.numpy()
        got = run(imported.graph, {"input_ids": ids.numpy()})[0]
        assert got.shape == want.shape
        assert relative_error(got, want) < 1e-4, (length, relative_error(got, want))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_from_hf_directory(family, family_dirs):
    with pytest.warns(UserWarning, match="no tokenizer files"):
        imported = import_model(family_dirs[family])
    verify(imported.graph)
    assert [str(n.type) for n in imported.graph.inputs] == ["i64[1, seq]"]
    assert str(imported.graph.outputs[0].type) == "f32[1, seq, 128]"
    model = transformers.AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32).eval()
    check_against_transformers(imported, model, 128)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_eager_attention_traces_too(family):
    model = tiny_model(family)
    model.config._attn_implementation = "eager"
    imported = import_model(model)
    assert "sdpa" not in imported.graph.op_histogram()
    assert "softmax" in imported.graph.op_histogram()
    check_against_transformers(imported, model, 128, lengths=[1, 67])


def test_text_form_round_trips_a_real_graph():
    imported = import_model(tiny_model("qwen2"))
    text = print_graph(imported.graph)
    reparsed = parse_graph(text, imported.graph.weights)
    verify(reparsed)
    assert print_graph(reparsed) == text
    ids = np.arange(5, dtype=np.int64)[None]
    np.testing.assert_array_equal(run(reparsed, [ids])[0], run(imported.graph, [ids])[0])


def test_weights_are_shared_not_copied():
    model = tiny_model("llama")
    imported = import_model(model)
    weights = imported.graph.weights
    # Tied embeddings: one tensor, stored once.
    assert sum(1 for a in weights.values() if a.shape == (128, 64)) == 1
    embed = model.model.embed_tokens.weight
    assert any(np.shares_memory(a, embed.detach().numpy()) for a in weights.values())


def test_plain_nn_module():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.proj = torch.nn.Linear(16, 50)

        def forward(self, ids):
            h = self.embed(ids)
            h = h + torch.cumsum(h, dim=1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]
            return self.proj(torch.nn.functional.gelu(h))

    model = Tiny().eval()
    imported = import_model(model, max_seq=128)
    ids = torch.randint(0, 50, (1, 9))
    want = model(ids).detach().numpy()
    assert relative_error(run(imported.graph, [ids.numpy()])[0], want) < 1e-5


def test_ops_of_more_families_import_and_match_torch():
    """Issue 16: what cohere, gptj, helium (interleaved rotary: repeat_interleave and stack),
    nemotron (square), falcon (x @ W.T, in-place +=) and cohere (LayerNorm written out) trace to;
    each checked against torch through the interpreter, after the passes too."""
    from llmc.passes.cleanup import simplify
    from llmc.passes.context import PassContext
    from llmc.passes.fuse import fuse

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.weight = torch.nn.Parameter(torch.randn(16, 16) * 0.3)
            self.norm = torch.nn.Parameter(1 + 0.1 * torch.randn(16))
            self.table = torch.nn.Parameter(torch.randn(128, 8))
            self.proj = torch.nn.Linear(16, 50)

        def forward(self, ids):
            h = self.embed(ids)
            mean = h.mean(-1, keepdim=True)
            variance = (h - mean).pow(2).mean(-1, keepdim=True)
            h = self.norm * ((h - mean) * torch.rsqrt(variance + 1e-5))          # cohere's LayerNorm
            out = h @ self.weight.T                                              # falcon's linear
            out += torch.square(torch.relu(h))                                   # nemotron; in place
            freqs = self.table[torch.arange(ids.shape[1])]                       # gptj's table by position
            emb = torch.repeat_interleave(freqs, 2, dim=-1)                      # [seq, 16]
            pairs = torch.stack([-out[..., 1::2], out[..., ::2]], dim=-1).flatten(-2)
            return self.proj(out * emb.cos() + pairs * emb.sin())

    model = Tiny().eval()
    imported = import_model(model, max_seq=128)
    ids = torch.randint(0, 50, (1, 9))
    want = model(ids).detach().numpy()
    assert relative_error(run(imported.graph, [ids.numpy()])[0], want) < 1e-5
    ops = {n.op for n in imported.graph.nodes()}
    assert "index" in ops and "mean" in ops
    optimised = fuse(simplify(imported.graph), PassContext(verify=True))
    assert relative_error(run(optimised, [ids.numpy()])[0], want) < 1e-5
    ops = {n.op for n in optimised.nodes()}
    assert "layer_norm" in ops and "mean" not in ops and "index" not in ops and "matmul" not in ops
