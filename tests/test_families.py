"""Issue 16's generalisation test: decoder families beyond the six the other tests name, as tiny
random configs, compiled for cpu f32 and checked greedily against transformers for 32 tokens,
plus a q4g32 build checked by perplexity against its f32 build. The families that still cannot
compile must fail with an error naming the op and the model's source line."""

import numpy as np
import pytest
import torch

from conftest import tiny_model
from llmc.compiler import compile_model
from llmc.errors import LlmcError
from llmc.frontend import import_model

import llmc

pytestmark = pytest.mark.slow           # a compile or two per family

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
LONG = dict(COMMON, max_position_embeddings=64)


def _config(name: str):
    import transformers as T

    return {
        "olmo": lambda: T.OlmoConfig(**COMMON),                              # LayerNorm without weights
        "olmo2": lambda: T.Olmo2Config(**COMMON),                            # QK norm, norms after blocks
        "stablelm": lambda: T.StableLmConfig(**COMMON),                      # partial rotary, LayerNorm
        "gpt_neox": lambda: T.GPTNeoXConfig(**{k: v for k, v in COMMON.items() if k != "num_key_value_heads"}),
        "phi": lambda: T.PhiConfig(**COMMON),                                # parallel block, partial rotary
        "starcoder2": lambda: T.Starcoder2Config(**COMMON),                  # biases, GELU MLP
        "granite": lambda: T.GraniteConfig(**COMMON),                        # residual and logit multipliers
        "qwen3": lambda: T.Qwen3Config(**COMMON, head_dim=16),               # QK RMSNorm
        "gemma3": lambda: T.Gemma3TextConfig(**COMMON, head_dim=16),         # sliding and global layers
        "helium": lambda: T.HeliumConfig(**COMMON, head_dim=16),             # interleaved rotary
        "cohere": lambda: T.CohereConfig(**COMMON),                          # interleaved rotary, parallel block,
                                                                             # LayerNorm written out
        "gptj": lambda: T.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                     rotary_dim=8),                          # interleaved partial rotary from a
                                                                             # table, parallel block
        "nemotron": lambda: T.NemotronConfig(**COMMON),                      # squared ReLU, LayerNorm1P
        "falcon": lambda: T.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4),             # x @ W.T, in-place add, parallel
        "gemma2": lambda: T.Gemma2Config(**COMMON, head_dim=16),            # soft-capped attention and logits
        # Rotary scaling variants, computed from the positions by the model's own code (short
        # trained context, so the scaled frequencies matter within the test's positions)
        "llama-linear": lambda: T.LlamaConfig(**LONG, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "llama-yarn": lambda: T.LlamaConfig(**LONG, rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                                   "original_max_position_embeddings": 32}),
        "llama-llama3": lambda: T.LlamaConfig(**LONG, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}),
        # Mixture of experts: normalised top-2 routing; unnormalised with shared experts behind a
        # sigmoid gate; unnormalised with QK norm
        "mixtral": lambda: T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32, shared_expert_intermediate_size=64),
        "olmoe": lambda: T.OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2),
        "granitemoe": lambda: T.GraniteMoeConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),  # top k
                                                                             # of the logits, then their softmax
        # Rotary scaling transformers chooses by the sequence's length, fixed for the artifact's
        # context (llmc.frontend.trace): dynamic NTK built for its trained 64 positions; LongRoPE
        # built for 128 > 32 trained, so its long factors (checked from a prompt past 32)
        "llama-dynamic": lambda: T.LlamaConfig(**LONG, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
        "phi3-longrope": lambda: T.Phi3Config(**dict(LONG, max_position_embeddings=128), pad_token_id=0,
                                              original_max_position_embeddings=32, rope_scaling={
                                                  "type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                                  "long_factor": [2.0 + 0.1 * i for i in range(8)]}),
        # Not yet: Phi-MoE's own rotary picks its scale with a Python branch on the longest position
        "phimoe": lambda: T.PhimoeConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    }[name]()


CHECKED = ["olmo", "olmo2", "stablelm", "gpt_neox", "phi", "starcoder2", "granite", "qwen3", "gemma3", "helium",
           "cohere", "gptj", "nemotron", "falcon", "gemma2", "llama-linear", "llama-yarn", "llama-llama3", "mixtral",
           "qwen2_moe", "olmoe", "granitemoe", "llama-dynamic", "phi3-longrope"]
# family -> what its error must name: the op (or the attention it could not place) and the source file
NOT_YET = {"phimoe": ("aten.max.default", "modeling_phimoe.py:")}
PROMPT = [3, 17, 42, 99, 5, 64, 120, 7]
PROMPTS = {"phi3-longrope": PROMPT * 5}   # past its 32 trained positions, where transformers uses the long factors


def tiny(name: str):
    return tiny_model(name, config=_config(name))


def greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def perplexity(model, ids: list[int]) -> float:
    logits = model.logits(ids).astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(np.exp(-np.mean(logp[np.arange(len(ids) - 1), ids[1:]])))


@pytest.mark.parametrize("name", CHECKED)
def test_a_family_compiles_and_decodes_like_transformers(name, tmp_path):
    model = tiny(name)
    imported = import_model(model)
    f32, q4 = tmp_path / "f32.llmc", tmp_path / "q4.llmc"
    compile_model(imported, f32, target="cpu", quant="f32", kv="f32", progress=None)
    prompt = PROMPTS.get(name, PROMPT)
    context = max(64, len(prompt) + 32)
    loaded = llmc.load(f32, max_context=context)
    want = greedy(model, prompt, 32)
    eos = sorted(loaded.eos_token_ids & set(want))
    if eos:                                   # generation stops at the first end token
        want = want[:want.index(eos[0])]
    assert loaded.generate(prompt, max_new_tokens=32) == want
    compile_model(imported, q4, target="cpu", quant="q4g32", kv="f32", progress=None)
    text = np.random.default_rng(0).integers(0, 128, 48).tolist()
    base, quantized = perplexity(loaded, text), perplexity(llmc.load(q4, max_context=context), text)
    assert abs(quantized / base - 1) < 0.05, (base, quantized)


@pytest.mark.parametrize("name,context,length,note", [("phi3-longrope", 32, 24, None),
                                                       ("llama-dynamic", 128, 128, "dynamic NTK rotary")])
def test_rotary_chosen_by_length_is_fixed_for_the_artifacts_context(name, context, length, note, tmp_path):
    """transformers picks LongRoPE's factors and dynamic NTK's base by each call's longest position;
    an artifact fixes them for its context, as vLLM does for max_model_len. LongRoPE built for its
    trained 32 positions has the short factors; dynamic NTK built for twice its 64 trained positions
    has the base transformers computes for 128 tokens, and says so. (The builds for the default
    context are CHECKED above.)"""
    model = tiny(name)
    ids = np.random.default_rng(2).integers(0, 128, length).tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    report = compile_model(model, tmp_path / "m.llmc", target="cpu", quant="f32", kv="f32", max_seq=context,
                           progress=None)
    said = [n for n in report.notes if "rotary" in n or "LongRoPE" in n]
    assert len(said) == (1 if note else 0) and all(note in n for n in said)
    got = llmc.load(tmp_path / "m.llmc").logits(ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_dynamic_ntk_contexts_reach_factor_times_the_trained_positions():
    from llmc.errors import UsageError
    from llmc.frontend import check_context

    config = tiny("llama-dynamic").config.to_dict()
    check_context(128, config, "llama")
    with pytest.raises(UsageError, match="give at most 128"):
        check_context(129, config, "llama")


@pytest.mark.parametrize("name", list(NOT_YET))
def test_a_family_that_cannot_compile_yet_names_the_op_and_the_line(name, tmp_path):
    op, where = NOT_YET[name]
    with pytest.raises(LlmcError) as error:
        compile_model(tiny(name), tmp_path / "m.llmc", target="cpu", quant="f32", progress=None)
    assert op in str(error.value)
    if where:
        assert where in str(error.value)


@pytest.mark.parametrize("name,interleaved", [("helium", True), ("cohere", True), ("gptj", True),
                                              ("stablelm", False), ("phi", False)])
def test_every_rotary_layout_becomes_the_rope_op(name, interleaved):
    """Interleaved pairs (Helium, Cohere, GPT-J from its sin/cos table) and partial rotary (StableLM,
    Phi, GPT-J: the rope runs on the rotated slice) are one rope op per q and k of each layer; no
    rotation is left as traced slices, negations and concats."""
    from llmc.pipeline import run_pipeline

    graph = run_pipeline(tiny(name), until="fuse", progress=None).graph
    ropes = [n for n in graph.nodes() if n.op == "rope"]
    assert len(ropes) == 4 and all(bool(n.attrs.get("interleaved")) == interleaved for n in ropes)
    assert not any(n.op == "neg" for n in graph.nodes())


def test_routed_experts_become_one_moe_op_per_layer():
    """Mixtral's routing (softmax, top 2, renormalised), traced as batched matmuls over gathered
    expert weights, is one moe op per layer; the expert weights are stacked 2-D and nothing of the
    traced routing is left."""
    from llmc.pipeline import run_pipeline

    graph = run_pipeline(tiny("mixtral"), until="fuse", progress=None).graph
    blocks = [n for n in graph.nodes() if n.op == "moe"]
    assert len(blocks) == 2
    assert blocks[0].attrs == {"experts": 4, "top_k": 2, "normalize": True, "act": "silu", "gated": True}
    assert blocks[0].inputs[2].type.shape == (4 * 2 * 96, 64) and blocks[0].inputs[3].type.shape == (4 * 64, 96)
    assert not {n.op for n in graph.nodes()} & {"topk", "index", "matmul", "softmax"}


def test_soft_capped_attention_becomes_one_op_with_its_cap():
    """Gemma 2's eager attention (scores * scale, then tanh(s / 50) * 50, then the mask) is placed
    on the KV cache as attention ops carrying the cap, not left as traced."""
    from llmc.pipeline import run_pipeline

    result = run_pipeline(tiny("gemma2"), until="attention", progress=None)
    sites = [n for n in result.graph.nodes() if n.op == "attention"]
    assert len(sites) == 2 and all(n.attrs["softcap"] == 50.0 for n in sites)
    assert not any(n.op == "softmax" for n in result.graph.nodes())
    # the final logits' cap runs after the LM head on the rows asked for, not on every token
    tail = result.graph.outputs[0]
    assert tail.op == "mul" and tail.type.shape[0] == "rows"
