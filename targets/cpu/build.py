"""Compile generated C into a shared library with the system compiler.

Builds are cached by content: the library for a given source, flags and compiler version lives
in ``<cache>/cpu/<sha256>/`` (``llmc.cache``), so an unchanged rebuild does not run the compiler.
The build runs in a fresh folder on fixed file names and strips the result, so the same source
gives the same bytes wherever it is built.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from llmc.cache import active, replace_folder
from llmc.errors import LlmcError

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
    # No errno and no floating-point traps (llmc never enables them): libm calls inline, and a
    # loop with a comparison (llmc_expf's clamp) can be vectorised; neither changes a result.
    return ["-O3", "-fPIC", "-shared", "-fopenmp", "-fvisibility=hidden", "-fno-math-errno", "-fno-trapping-math",
            "-s"] + LEVELS[level][0]


@lru_cache(maxsize=None)
def compiler_version(cc: str) -> str:
    """The compiler's own banner (``gcc (Debian 12.2.0-14) 12.2.0``): part of every library's key."""
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"cannot run the C compiler {cc}: {exc}") from None
    return (done.stdout.splitlines() or ["unknown"])[0]


def build_shared_library(source: str, level: str, name: str = "model") -> tuple[bytes, Path]:
    """(library bytes, path of the source it was built from); cached by content."""
    cache = active()
    cc = compiler()
    command = [cc] + flags(level) + ["-o", f"{name}.so", f"{name}.c", "-lm"]
    key = hashlib.sha256("\0".join(command[1:] + [compiler_version(cc), source]).encode()).hexdigest()[:32]
    found = cache.lookup("cpu library", cache.entry("cpu", key, f"{name}.so"))
    if found:
        return found.read_bytes(), found.with_name(f"{name}.c")
    folder = cache.home("cpu", key)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    except OSError as exc:
        raise BuildError(f"cannot create the build folder under {folder.parent}: {exc.strerror or exc}; "
                         "set LLMC_CACHE_DIR to a writable folder, or build with --cache off") from None
    try:
        (work / f"{name}.c").write_text(source)
        done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    except BaseException:               # an error, Ctrl-C, SIGTERM in the CLI: no scratch folder left
        shutil.rmtree(work, ignore_errors=True)
        raise
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or ["?"]
        # Kept for the user to read: in the cache, or (when the build stores nothing there, and
        # its scratch folder is about to go) in the system's temporary folder.
        kept = (folder.parent if cache.writes else Path(tempfile.gettempdir())) / f"llmc-failed-{key}"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.move(str(work), str(kept))
        raise BuildError(f"{cc} failed on the generated code {kept / (name + '.c')}: {errors[0].strip()}")
    replace_folder(work, folder, cache)
    return (folder / f"{name}.so").read_bytes(), folder / f"{name}.c"
