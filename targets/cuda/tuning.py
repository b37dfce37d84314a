"""Kernel parameters per GPU architecture: block sizes, warps and pipeline stages.

The defaults are sound on every arch from sm_80 (they fit its shared memory and registers); a
table tuned on a GPU overrides them per arch and kernel from ``<cache>/cuda/tuning.json``
(``{"sm_90": {"gemm": {"BLOCK_M": 128, ...}}}``), so a build machine without a GPU uses tables
measured elsewhere. Parameters are part of each kernel's identity, so they are part of the
artifact and of the build cache key.
"""

from __future__ import annotations

import json

from llmc.errors import LlmcError

DEFAULTS = {
    "gemv": {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4},
    "gemm": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    "attn_decode": {"SPLITS": 16, "BLOCK_N": 64, "num_warps": 4},
    "attn_prefill": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    "elementwise": {"BLOCK": 1024, "num_warps": 4},
}
# Hopper has 228 KB of shared memory per SM and wider tensor-core tiles.
PER_ARCH = {
    90: {"gemm": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
         "attn_prefill": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}},
}
POWERS_OF_TWO = ("BLOCK", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLITS", "num_warps")


def table(arch: int, overrides_file=None) -> dict:
    """The parameters for ``arch`` (e.g. 90): defaults, the arch's own, then the tuned table."""
    out = {kernel: dict(values) for kernel, values in DEFAULTS.items()}
    for kernel, values in PER_ARCH.get(arch, {}).items():
        out[kernel].update(values)
    if overrides_file is not None and overrides_file.exists():
        try:
            tuned = json.loads(overrides_file.read_text()).get(f"sm_{arch}", {})
        except (OSError, ValueError) as exc:
            raise LlmcError(f"cannot read the cuda tuning table {overrides_file}: {exc}; fix or delete it") from None
        for kernel, values in tuned.items():
            if kernel in out:
                out[kernel].update(values)
    for kernel, values in out.items():
        for name, value in values.items():
            if name in POWERS_OF_TWO and (not isinstance(value, int) or value < 1 or value & (value - 1)):
                raise LlmcError(f"cuda tuning for sm_{arch} {kernel}: {name} must be a power of two, not {value!r}")
    if out["gemm"]["BLOCK_M"] < 16 or out["attn_prefill"]["BLOCK_N"] < 16:
        raise LlmcError(f"cuda tuning for sm_{arch}: tensor-core tiles need blocks of at least 16")
    return out
