"""Target ``onnx``: the optimised step graph as an ONNX model that ONNX Runtime runs (CPU, or CUDA
with ``onnxruntime-gpu``), for deployments built on ORT.

- lower.py    graph -> ONNX (standard opset ops; ORT's contrib MatMulNBits for q8/q4 linears and
              Skip/SimplifiedLayerNormalization for norms); weights are external initializers
- weights.py  the initializers made at load from the artifact's tensors (MatMulNBits's parts)
- session.py  the runtime side: an InferenceSession over the artifact's weights and a host KV pool

The model section holds no weight bytes: the artifact's weights (one copy) are handed to ORT when
the artifact is loaded. Building needs ``onnx`` (the ``onnx`` extra); running, ``onnxruntime``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from llmc.errors import UsageError

from .. import DEFAULT_MAX_TOKENS, Build, check_chunk, chunk_option

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
KV_FORMATS = ("f16", "f32")     # the pool in f32 or f16; no int8 pool
DEFAULT_KV = "f32"
OPSETS = range(17, 24)
ACT_DTYPES = ("f32", "f16")


def act_dtype(options) -> str:
    """The build's activation dtype: as asked, else f16 on CUDA (as ORT GenAI's CUDA builds) and f32
    on the CPU provider (whose f16 kernels are few: ORT casts around the rest)."""
    return options.act_dtype or ("f16" if options.provider == "cuda" else "f32")


@dataclass(frozen=True)
class Options:
    provider: str = field(default="cpu", metadata={
        "help": "the ONNX Runtime execution provider an onnx build runs on: cpu, or cuda (onnxruntime-gpu)",
        "choices": list(PROVIDERS)})
    opset: int = field(default=21, metadata={
        "help": f"the ONNX opset of an onnx build ({OPSETS.start} to {OPSETS.stop - 1})", "metavar": "N"})
    accuracy_level: int = field(default=4, metadata={
        "help": "MatMulNBits's accuracy level for q8/q4 linears of an onnx build: 4 multiplies int8-rounded "
                "activations (as the cpu target does), 0 the exact product with the dequantized weight",
        "choices": [0, 1, 2, 3, 4]})
    act_dtype: str | None = field(default=None, metadata={
        "help": "activation dtype of an onnx build: f32, or f16 (the rope's angles stay f32); default f16 "
                "with --provider cuda, else f32",
        "choices": list(ACT_DTYPES)})
    chunk: int | None = chunk_option()


def check(options: Options) -> None:
    if options.provider not in PROVIDERS:
        raise UsageError(f"unknown provider {options.provider!r} for target onnx; choose {', '.join(PROVIDERS)}")
    if not isinstance(options.opset, int) or options.opset not in OPSETS:
        raise UsageError(f"the onnx target writes opsets {OPSETS.start} to {OPSETS.stop - 1}, not {options.opset!r}")
    if options.accuracy_level not in range(5):
        raise UsageError(f"MatMulNBits's accuracy level is 0 to 4, not {options.accuracy_level!r}")
    if options.act_dtype is not None and options.act_dtype not in ACT_DTYPES:
        raise UsageError(f"an onnx build's activations are {' or '.join(ACT_DTYPES)}, not {options.act_dtype!r}")
    check_chunk(options.chunk)


def emit(graph, options: Options, progress=None) -> Build:
    """The lower phase for target onnx: the ONNX model (without weight bytes) and its initializers."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise UsageError("building for target onnx needs the onnx package: pip install 'llmc-compiler[onnx]'")
    from .lower import lower

    act = act_dtype(options)
    model, initializers, pool_dtype = lower(graph, options.opset, options.accuracy_level, act)
    data = model.SerializeToString()
    nodes = {}
    for node in model.graph.node:
        nodes[node.op_type] = nodes.get(node.op_type, 0) + 1
    chunk = options.chunk or DEFAULT_MAX_TOKENS
    manifest = {"name": "onnx", "executor": f"ONNX Runtime, {PROVIDERS[options.provider]}",
                "provider": options.provider, "opset": options.opset,
                "accuracy_level": options.accuracy_level, "act_dtype": act, "chunk": chunk, "max_tokens": chunk,
                "initializers": [i.record() for i in initializers], "nodes": nodes}
    contrib = sum(n for op, n in nodes.items() if op in ("MatMulNBits", "SkipSimplifiedLayerNormalization",
                                                          "SkipLayerNormalization", "SimplifiedLayerNormalization"))
    summary = (f"{len(model.graph.node)} ONNX nodes ({contrib} of ORT's fused and quantized ops), opset "
               f"{options.opset}, {act} activations, model {len(data) / 1e3:.0f} kB without weights, provider "
               f"{options.provider}")
    return Build({"onnx": data}, manifest, chunk, {}, pool_dtype=pool_dtype, summary=summary,
                 report={"nodes": nodes, "model_bytes": len(data)})


def describe(artifact) -> list[str]:
    target = artifact.manifest["target"]
    top = ", ".join(f"{op} x{n}" for op, n in sorted(target["nodes"].items(), key=lambda kv: -kv[1])[:8])
    act = target.get("act_dtype", "f32")
    return [f"onnx      opset {target['opset']}, provider {target['provider']}, {act} activations, "
            f"up to {target['chunk']} tokens a "
            f"call, {sum(target['nodes'].values())} nodes: {top}, ..."]


ORT_AT_LEAST = (1, 32)       # GroupQueryAttention's query_seqlens: a step's chunks of any lengths in one call


def ort_too_old(version: str) -> str | None:
    """Why this onnxruntime cannot run an onnx build, or None."""
    try:
        have = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None                 # a development build: let it try
    if have < ORT_AT_LEAST:
        return (f"needs onnxruntime {'.'.join(map(str, ORT_AT_LEAST))} or newer (GroupQueryAttention's "
                f"query_seqlens), not {version}: pip install -U 'llmc-compiler[onnx]'")
    return None


def runs_here(manifest) -> tuple[bool, str | None]:
    try:
        import onnxruntime
    except ImportError:
        return False, "needs onnxruntime (pip install 'llmc-compiler[onnx]')"
    too_old = ort_too_old(onnxruntime.__version__)
    if too_old:
        return False, too_old
    provider = PROVIDERS.get(manifest["target"].get("provider"), "?")
    if provider not in onnxruntime.get_available_providers():
        return False, f"this onnxruntime lacks {provider} (onnxruntime-gpu has CUDA)"
    return True, None


def check_artifact(artifact) -> None:
    """The manifest's onnx entry for its types, and its initializers against the artifact's tensors."""
    from llmc.artifact import ArtifactError
    from llmc.manifest import ManifestError, check_dict, check_int, check_list, check_str

    from .weights import KINDS

    target = artifact.manifest["target"]
    tensors = artifact.manifest.get("tensors", {})
    try:
        check_dict(target, "target", ("provider", "opset", "accuracy_level", "chunk", "max_tokens", "initializers",
                                      "nodes"))
        check_str(target["provider"], "target.provider")
        if target.get("act_dtype", "f32") not in ACT_DTYPES:        # builds before the option are f32
            raise ManifestError("target.act_dtype", f"is {json.dumps(target['act_dtype'])[:40]}, not one of "
                                f"{', '.join(ACT_DTYPES)}")
        check_int(target["chunk"], "target.chunk", 1, 1 << 20)
        check_list(target["initializers"], "target.initializers")
        for record in target["initializers"]:
            if not (isinstance(record, list) and len(record) == 5 and isinstance(record[0], str)
                    and record[1] in KINDS
                    and isinstance(record[2], list) and all(isinstance(s, str) for s in record[2])):
                raise ManifestError("target.initializers", f"holds {json.dumps(record)[:80]}, not "
                                    "[name, kind, [tensors], dtype, shape]")
            missing = [s for s in record[2] if s not in tensors]
            if missing:
                raise ManifestError("target.initializers", f"names tensor {missing[0]!r}, which the artifact lacks")
    except ManifestError as exc:
        raise ArtifactError(f"{artifact.path}: {exc}; rebuild the artifact") from None
    if target["provider"] not in PROVIDERS:
        raise ArtifactError(f"{artifact.path}: provider {target['provider']!r} is not one of {', '.join(PROVIDERS)}; "
                            "rebuild the artifact")


def executor(artifact, threads: int | None = None):
    check_artifact(artifact)
    from .session import OnnxExecutor

    return OnnxExecutor(artifact, threads)


def export(artifact, directory) -> list[str]:
    """The artifact as a standalone ONNX model folder (``llmc export``): model.onnx with its weights
    in model.onnx.data (the initializers made as the executor makes them), tokenizer.json when the
    artifact has a tokenizer, and step.json: the step's inputs and outputs, and how its caches are
    laid out and appended to. Needs the onnx package."""
    from pathlib import Path

    try:
        import onnx
    except ImportError:
        raise UsageError("exporting an onnx artifact needs the onnx package: pip install 'llmc-compiler[onnx]'") from None
    from .weights import initializers

    directory = Path(directory)
    manifest = artifact.manifest
    model = onnx.load_from_string(bytes(artifact.section("onnx")))
    declared = {t.name: t for t in model.graph.initializer}
    offset = 0
    placed: dict[tuple[int, int], int] = {}     # an array's memory -> its offset: one array, written once
    with open(directory / "model.onnx.data", "wb") as data:
        for name, array in initializers(artifact):
            memory = (array.__array_interface__["data"][0], array.nbytes)
            if memory not in placed:            # (a tied embedding's rows and its LM head's codes are one)
                offset += -offset % 64
                data.write(b"\0" * (offset - data.tell()))
                data.write(array.tobytes())
                placed[memory] = offset
                offset += array.nbytes
            entry = declared[name]
            del entry.external_data[:]
            for key, value in (("location", "model.onnx.data"), ("offset", str(placed[memory])),
                               ("length", str(array.nbytes))):
                item = entry.external_data.add()
                item.key, item.value = key, value
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    written = ["model.onnx", "model.onnx.data"]
    if manifest.get("tokenizer"):
        (directory / "tokenizer.json").write_bytes(bytes(artifact.section("tokenizer")))
        written.append("tokenizer.json")
    pool = manifest["kv_pool"]
    act = manifest["target"].get("act_dtype", "f32")
    cache = f"{act}[batch, {pool['kv_heads']}, capacity, {pool['head_dim']}]"
    step = {
        "inputs": {
            "tokens": "i64[seq]: the step's tokens, of one or more sequences",
            "positions": "i64[seq]: each token's position in its sequence",
            "logit_rows": "i64[rows]: the token rows whose logits are returned",
            "gqa_tokens": "i64[batch, chunk, 2]: per batch entry (one a sequence), (0, the row of each of its tokens "
                          "in the step) in position order, right-padded with (0, 0)",
            "gqa_slots": "i64[1, seq, 2]: each token's (entry, position - the entry's first position in the step)",
            "seqlens_k": "i32[batch]: per entry, its length after the step minus 1 (0 for an idle entry)",
            "query_seqlens": "i32[batch]: per entry, its tokens in the step (0: idle, its cache left as it is)",
            "total_length": "i32[]: at least seqlens_k + 1 and the step's tokens (the rows of the rope's tables)",
            "past_k.L, past_v.L": f"{cache} per layer L: each entry's keys and values at positions 0..length-1; "
                                  "bind present_k.L and present_v.L to the same buffers, and GroupQueryAttention "
                                  "appends the step's in place",
        },
        "outputs": {"logits": "f32[rows, vocab]: the rows logit_rows names",
                    "present_k.L, present_v.L": "the caches, appended to (the past buffers when bound to them)"},
        "layers": pool["layers"], "kv_heads": pool["kv_heads"], "head_dim": pool["head_dim"],
        "vocab_size": manifest["vocab_size"],
        "max_tokens": manifest["target"]["max_tokens"], "eos_token_ids": manifest.get("eos_token_ids"),
        "provider": manifest["target"]["provider"], "opset": manifest["target"]["opset"], "act_dtype": act,
    }
    (directory / "step.json").write_text(json.dumps(step, indent=2) + "\n")
    return written + ["step.json"]
