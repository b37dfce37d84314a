"""What a target's code was built for, recorded in a checksummed section at build time and
compared with the manifest before the code runs (``Target.check_artifact``).

Generated code has every size baked in (its weights' shapes and order, its vocabulary, its pool
tensors, the most tokens a call takes); its executor sizes buffers from the manifest. A manifest
edited out of step with the code (digest recomputed, so every checksum still matches) would have
the code read and write past those buffers. The code's record is covered by its section's
checksum; the manifest's values are used only when they agree with it. Each target keeps the
record where its code is: the cpu library carries it (cpu/expects.py), the cuda plan holds it.
"""

from __future__ import annotations

import json
from typing import Any

from llmc.artifact import ArtifactError


def record(graph, weight_names: list[str]) -> dict[str, Any]:
    """The parts every target records: the vocabulary, the pool's tensors and the weights the
    code reads, in its order, with their dtype and shape (as the manifest's tensor table has them)."""
    from llmc.abi import BATCH_INPUTS

    types = {n.attrs["name"]: n.type for n in graph.nodes() if n.op == "weight"}
    vocab = graph.outputs[0].type.shape[-1]
    return {
        "vocab": vocab if isinstance(vocab, int) else None,        # (kernel tests lower other graphs)
        "pool": [[n.attrs["name"], str(n.type)] for n in graph.inputs[len(BATCH_INPUTS):]],
        "weights": [[name, types[name].dtype, [int(d) for d in types[name].shape]] for name in weight_names],
    }


def require(expects: Any, keys: tuple[str, ...], path) -> dict[str, Any]:
    """``expects`` if it has every key (the common ones and the target's ``keys``); else an
    ArtifactError: an older llmc built the code, without the record or with another one."""
    lacking = [k for k in ("vocab", "max_tokens", "pool", "weights", *keys)
               if not isinstance(expects, dict) or k not in expects]
    if lacking:
        raise ArtifactError(f"{path}: its code carries no record of {', '.join(lacking)} (an older llmc built it): "
                            "rebuild the artifact with this llmc")
    return expects


def compare(manifest: dict[str, Any], expects: dict[str, Any], weights: Any, path,
            extra: list[tuple[str, Any, Any]] = ()) -> None:
    """An ArtifactError at the first of the manifest's values that differs from the code's record
    (``weights``: the manifest's list of the weights the code reads, in order): the common parts,
    then the target's ``extra`` (what, the manifest's value, the record's)."""
    tensors = manifest.get("tensors", {})
    checks = [
        ("its vocabulary", manifest["vocab_size"], expects["vocab"]),
        ("the most tokens a call takes (entry_points.step.max_tokens)",
         manifest["entry_points"]["step"]["max_tokens"], expects["max_tokens"]),
        ("its KV pool tensors", [list(t) for t in manifest["kv_pool"]["tensors"]], expects["pool"]),
        ("the weights it reads, in order (target.weights)", weights, [w[0] for w in expects["weights"]]),
        *extra,
    ]
    for name, dtype, shape in expects["weights"]:
        t = tensors.get(name)
        checks.append((f"weight {name}", None if t is None else [t["dtype"], t["shape"]], [dtype, shape]))
    for what, said, built in checks:
        if said != built:
            raise ArtifactError(f"{path}: its manifest does not match its compiled code in {what}: the manifest "
                                f"says {_short(said)}, the code was built for {_short(built)}. A tool edited the "
                                "manifest; rebuild the artifact")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
