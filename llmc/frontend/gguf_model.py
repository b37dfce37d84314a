"""Build a transformers model straight from a GGUF file, with one fp32 copy of the weights.

The model skeleton is created without allocating parameters, each tensor is dequantized once
and assigned in place. Architectures whose GGUF tensor layout llmc knows are listed in
``GGUF_ARCHS``; the others go through transformers' own (slower) GGUF loader.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmc.errors import SourceError
from llmc.frontend.gguf_file import GGUFFile

# GGUF architecture -> (transformers model_type, whether llama.cpp permuted q/k for its rope layout).
GGUF_ARCHS = {"llama": ("llama", True), "qwen2": ("qwen2", False)}


def gguf_config(f: GGUFFile) -> Any:
    """The transformers config that the GGUF metadata describes."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = f.architecture
    model_type = GGUF_ARCHS[arch][0]
    meta = f.metadata
    kwargs: dict[str, Any] = {}
    for key, hf_key in GGUF_CONFIG_MAPPING.get(arch, {}).items():
        value = meta.get(f"{arch}.{key}")
        if hf_key and value is not None:
            kwargs[hf_key] = value
    for key, hf_key in GGUF_CONFIG_MAPPING["tokenizer"].items():
        if f"tokenizer.{key}" in meta:
            kwargs[hf_key] = meta[f"tokenizer.{key}"]
    if "vocab_size" not in kwargs and "tokenizer.ggml.tokens" in meta:
        kwargs["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    kwargs["tie_word_embeddings"] = "output.weight" not in f.tensors
    return AutoConfig.for_model(model_type, **kwargs)


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved rotary pairs) back to transformers' half-split order."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def load_gguf_model(f: GGUFFile, attn_implementation: str | None, spec: str):
    import gguf
    import torch
    import transformers
    from accelerate import init_empty_weights

    from llmc.frontend.sources import check_decoder_only

    arch = f.architecture
    _, permuted = GGUF_ARCHS[arch]
    config = gguf_config(f)
    check_decoder_only(config, spec)
    with init_empty_weights():  # parameters on the meta device, buffers (rotary tables) real
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=attn_implementation)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    expected = dict(model.named_parameters())
    state = {}
    for key, param in expected.items():
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name not in f.tensors:
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue
            raise SourceError(f"{f.path} lacks the tensor {gguf_name or key} that {arch} needs for {key}")
        array = f.dequantize(gguf_name)
        if permuted and key.endswith("self_attn.q_proj.weight"):
            array = _unpermute(array, config.num_attention_heads)
        elif permuted and key.endswith("self_attn.k_proj.weight"):
            array = _unpermute(array, config.num_key_value_heads)
        if tuple(array.shape) != tuple(param.shape):
            raise SourceError(f"{f.path}: tensor {gguf_name} has shape {array.shape}, {key} needs {tuple(param.shape)}")
        state[key] = torch.from_numpy(np.ascontiguousarray(array))
    f.release_pages()
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    still_empty = [k for k, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise SourceError(f"{f.path} does not provide {', '.join(still_empty[:3])}")
    return model.eval()
