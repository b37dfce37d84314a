"""Compile generated C into a shared library with the system compiler.

Builds are cached by content: the library for a given source and flags lives in
``<cache>/cpu/<sha256>/`` (cache: ``$LLMC_CACHE_DIR``, default ``~/.cache/llmc``), so an unchanged
rebuild does not run the compiler. The build runs in that folder on fixed file names and strips
the result, so the same source gives the same bytes wherever it is built.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from llmc.errors import LlmcError

from .. import cache_dir

KERNELS = Path(__file__).with_name("kernels.c")

# Feature levels: compiler flags and the CPU flags (as /proc/cpuinfo names them) an artifact built
# at that level needs. x86-64-v3 is what every AVX2 machine since Haswell / Zen 1 has.
LEVELS = {
    "portable": ([], []),
    "x86-64-v3": (["-march=x86-64-v3"], ["avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"]),
    "native": (["-march=native"], None),    # needs what this machine has
}
NATIVE_FLAGS = ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                "avx512_vnni", "avx_vnni", "asimd", "asimddp", "sve")


class BuildError(LlmcError):
    """The system compiler is missing or rejected the generated code."""


def compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise BuildError("no C compiler found: the cpu target needs gcc or clang (apt-get install gcc), or set CC")


def default_level(features: set[str]) -> str:
    return "x86-64-v3" if set(LEVELS["x86-64-v3"][1]) <= features else "portable"


def level_requirements(level: str, features: set[str]) -> list[str]:
    """The CPU flags an artifact built at ``level`` (a key of LEVELS) requires."""
    need = LEVELS[level][1]
    return sorted(f for f in NATIVE_FLAGS if f in features) if need is None else list(need)


def flags(level: str) -> list[str]:
    return ["-O3", "-fPIC", "-shared", "-fopenmp", "-fvisibility=hidden", "-fno-math-errno", "-s"] + LEVELS[level][0]


def build_shared_library(source: str, level: str, name: str = "model") -> tuple[bytes, Path]:
    """(library bytes, path of the source it was built from); cached by content."""
    cc = compiler()
    command = [cc] + flags(level) + ["-o", f"{name}.so", f"{name}.c", "-lm"]
    key = hashlib.sha256("\0".join(command[1:] + [source]).encode()).hexdigest()[:32]
    folder = cache_dir() / "cpu" / key
    library = folder / f"{name}.so"
    if library.is_file():
        return library.read_bytes(), folder / f"{name}.c"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    except OSError as exc:
        raise BuildError(f"cannot create the build folder under {folder.parent}: {exc.strerror or exc}; "
                         "set LLMC_CACHE_DIR to a writable folder") from None
    (work / f"{name}.c").write_text(source)
    done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or ["?"]
        kept = folder.parent / f"failed-{key}"
        shutil.rmtree(kept, ignore_errors=True)
        work.rename(kept)
        raise BuildError(f"{cc} failed on the generated code {kept / (name + '.c')}: {errors[0].strip()}")
    try:
        work.rename(folder)
    except OSError:               # built by another process meanwhile: keep theirs
        shutil.rmtree(work, ignore_errors=True)
    return library.read_bytes(), folder / f"{name}.c"
