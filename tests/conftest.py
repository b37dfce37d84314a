"""Shared fixtures: tiny random models of each family, saved as Hugging Face directories."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

# The verifier runs after every pipeline phase under tests.
os.environ["LLMC_VERIFY"] = "1"
# cuda kernels run on CPU tensors through Triton's interpreter (the switch is read when Triton is
# imported); cross-compilation runs in worker processes without it.
os.environ["TRITON_INTERPRET"] = "1"
# The build cache of a test session is its own, never the user's (~/.cache/llmc).
_CACHE = tempfile.TemporaryDirectory(prefix="llmc-test-cache-")
os.environ["LLMC_CACHE_DIR"] = _CACHE.name
# Under pytest-xdist two workers share two cores: OpenMP threads that spin at a barrier would wait on
# a partner the other worker has descheduled, so they sleep instead (read when libgomp loads).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def family_config(name: str):
    import transformers as T

    return {
        "llama": lambda: T.LlamaConfig(**COMMON, tie_word_embeddings=True),
        "qwen2": lambda: T.Qwen2Config(**COMMON),                           # attention bias
        "mistral": lambda: T.MistralConfig(**COMMON, sliding_window=16),    # window < longest test
        "phi3": lambda: T.Phi3Config(**COMMON, pad_token_id=0),             # fused qkv, gate_up
        "gemma": lambda: T.GemmaConfig(**COMMON, head_dim=16),              # scaled embeddings, GeGLU
        "gpt2": lambda: T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    }[name]()


FAMILIES = ["llama", "qwen2", "mistral", "phi3", "gemma", "gpt2"]


def tiny_model(name: str, seed: int = 0, config=None):
    """A random model of family ``name`` (``config``, a transformers config, for others)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config or family_config(name)).eval()
    # Random init leaves norms at 1 and biases at 0; perturb every tensor so each one matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


class Families(dict):
    """name -> (transformers model, its imported form), each built the first time it is asked for
    (the fast tier asks for a few of them)."""

    def __missing__(self, name):
        from llmc.frontend import import_model

        model = tiny_model(name)
        self[name] = (model, import_model(model))
        return self[name]


@pytest.fixture(scope="module")
def families():
    """Families() for the module (test_cuda_target's own fixture of this name imports them all)."""
    return Families()


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """name -> directory holding config.json + model.safetensors (no tokenizer files)."""
    out = {}
    for name in FAMILIES:
        path = tmp_path_factory.mktemp(name)
        tiny_model(name).save_pretrained(path)
        out[name] = path
    return out


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


# Zeroed arrays for a step graph's KV pool inputs (everything after the batch's), ``blocks`` blocks.
from llmc.abi import graph_pool as new_pool  # noqa: E402, F401  (after the environment above)


def run_step(graph, pool, ids, start: int, table, rows: str = "last") -> np.ndarray:
    """The interpreter's logits for one sequence's ``ids`` at ``start..`` (block table ``table``)."""
    from llmc.abi import Batch
    from llmc.interpret import run

    return run(graph, list(Batch.single(np.asarray(ids), start, np.asarray(table), rows).inputs().values()) + pool)[0]


# A chat template that shows its tools (as JSON) when a request passes them.
CHAT = ("{% if tools %}<tools>{{ tools | tojson }}\n{% endif %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def byte_tokenizer():
    """A byte-level BPE without merges: 256 tokens, one a byte, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT)


@pytest.fixture(scope="session")
def chat_artifact(tmp_path_factory):
    """A tiny random Llama with a 256-token byte tokenizer and a chat template, for cpu: blocks of
    4 tokens, steps of at most 32 (so prompts are chunked and sequences span many blocks)."""
    import torch
    import transformers

    from llmc.compiler import compile_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      eos_token_id=None, bos_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = tmp_path_factory.mktemp("chat")
    model.save_pretrained(folder / "hf")
    byte_tokenizer().save_pretrained(folder / "hf")
    path = folder / "tiny.llmc"
    compile_model(str(folder / "hf"), path, target="cpu", block_size=4, chunk=32, progress=None)
    return path
