"""Cross-compiling the plan's kernels to cubins: Triton, no GPU and no driver needed.

Each (kernel, arch) is a job keyed by everything that decides its cubin: the module's source, the
function, signature, constexprs, launch options, the arch and the Triton version. Finished jobs
live in ``<cache>/cuda/kernels/<key>.cubin`` with their launch metadata beside them
(``llmc.cache``), so an unchanged rebuild compiles nothing. Missing jobs run in worker processes (``python -m
llmc.targets.cuda.build``): Triton's compiler state stays out of the compiling process, the
workers run in parallel, and a process that set ``TRITON_INTERPRET=1`` (the tests, the emulator)
can still cross-compile.

Launch metadata comes from the PTX entry: the parameter list (Triton appends two scratch
pointers to the kernel's own arguments), the warps and the dynamic shared memory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from llmc.cache import active
from llmc.errors import LlmcError

KERNELS = Path(__file__).with_name("kernels.py")
_PARAM = re.compile(r"\.param\s+\.(\w+)")


class BuildError(LlmcError):
    """A kernel Triton could not compile, or a missing compiler."""


def triton_version() -> str:
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        raise BuildError("building for --target cuda needs Triton: pip install 'llmc-compiler[cuda]'") from None


def cache_dir() -> Path:
    """The cuda folder of the cache, for what the runtime keeps there (emulated kernels)."""
    from llmc.cache import root

    return root() / "cuda"


def job_key(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


def compile_kernels(kernels: dict[int, dict[str, dict]], sources: dict[str, str], progress=None,
                    workers: int | None = None) -> tuple[dict[int, dict[str, tuple[bytes, dict]]], int]:
    """{arch: {key: (cubin, launch metadata)}} for the kernels wanted per arch (their modules'
    source in ``sources``), and how many came from the cache."""
    cache = active()
    version = triton_version()
    jobs: dict[str, dict] = {}
    wanted: dict[int, dict[str, str]] = {}
    for arch, entries in kernels.items():
        for key, entry in sorted(entries.items()):
            source = sources[entry["module"]]
            job = {"source": source, "function": entry["function"], "arguments": entry["arguments"],
                   "constexprs": entry["constexprs"], "options": entry["options"], "arch": arch, "triton": version, "line_info": False}
            digest = job_key(job)
            jobs[digest] = job
            wanted.setdefault(arch, {})[key] = digest
    found = {d: cache.lookup("cuda kernel", cache.entry("cuda", "kernels", f"{d}.json")) for d in sorted(jobs)}
    missing = [d for d, path in found.items() if path is None]
    if missing:
        _run_workers({d: jobs[d] for d in missing}, cache.home("cuda", "kernels"), progress, workers)
    out: dict[int, dict[str, tuple[bytes, dict]]] = {}
    for arch, keys in wanted.items():
        out[arch] = {}
        for key, digest in keys.items():
            folder = found[digest].parent if found[digest] else cache.home("cuda", "kernels")
            try:
                meta = json.loads((folder / f"{digest}.json").read_text())
                cubin = (folder / f"{digest}.cubin").read_bytes()
            except (OSError, ValueError) as exc:
                raise BuildError(f"the cuda kernel cache entry {digest} is unreadable ({exc}); delete {folder}") from None
            out[arch][key] = (cubin, meta)
    return out, len(jobs) - len(missing)


def _run_workers(jobs: dict[str, dict], folder: Path, progress, workers: int | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    count = max(1, min(workers or len(os.sched_getaffinity(0)), len(jobs), 8))
    shares = [dict(list(jobs.items())[i::count]) for i in range(count)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cache = active()
    if cache.policy == "on":
        env.setdefault("TRITON_CACHE_DIR", str(cache.entry("cuda", "triton")))
    else:                                      # Triton's own cache follows the policy too
        env["TRITON_CACHE_DIR"] = str(cache.home("cuda", "triton"))
    env["TRITON_DISABLE_LINE_INFO"] = "1"      # line info names the source file's path: builds must not
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    # stderr goes to files: a worker blocked on a full pipe while we read another would never finish.
    logs = [tempfile.TemporaryFile("w+") for _ in shares]
    procs = [subprocess.Popen([sys.executable, "-m", "llmc.targets.cuda.build", str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=log, text=True, env=env) for log in logs]
    for proc, share in zip(procs, shares):
        proc.stdin.write(json.dumps(share))
        proc.stdin.close()
    done = 0
    failures = []
    for proc, log in zip(procs, logs):
        for line in proc.stdout:
            if line.startswith("done "):
                done += 1
                if progress and progress.isatty():
                    progress.write(f"\r      cuda kernels: compiled {done}/{len(jobs)}")
                    progress.flush()
            elif line.startswith("error "):
                failures.append(line[6:].strip())
        log.seek(0)
        stderr = log.read()
        if proc.wait() != 0 and not failures:
            failures.append(stderr.strip().splitlines()[-1] if stderr.strip() else f"worker exited {proc.returncode}")
    if progress and progress.isatty():
        progress.write("\n")
    if failures:
        raise BuildError("Triton could not compile a cuda kernel: " + failures[0])


def ptx_params(ptx: str, name: str) -> list[str]:
    """The PTX types of an entry's parameters, in order (u64 for pointers)."""
    start = ptx.index(f".entry {name}(")
    return _PARAM.findall(ptx[start: ptx.index(")", start)])


def _compile_job(job: dict, folder: Path) -> tuple[bytes, dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    digest = hashlib.sha256(job["source"].encode()).hexdigest()[:16]
    path = folder.parent / "src" / f"llmc_cuda_{digest}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != job["source"]:
        path.write_text(job["source"])
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = sys.modules.get(path.stem) or importlib.util.module_from_spec(spec)
    if path.stem not in sys.modules:
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    fn = getattr(module, job["function"])
    options = dict(job["options"], enable_fp_fusion=True)
    signature = dict(job["arguments"]) | {name: "constexpr" for name in job["constexprs"]}
    compiled = triton.compile(ASTSource(fn, signature, job["constexprs"]),
                              target=GPUTarget("cuda", job["arch"], 32), options=options)
    md = compiled.metadata
    params = ptx_params(compiled.asm["ptx"], md.name)
    arguments = job["arguments"]
    if len(params) != len(arguments) + 2:
        raise BuildError(f"{job['function']}: the cubin takes {len(params)} parameters, llmc passes "
                         f"{len(arguments)} + 2 scratch pointers; this Triton's launch ABI is not supported")
    meta = {"name": md.name, "num_warps": md.num_warps, "shared": md.shared, "params": params,
            "global_scratch": [md.global_scratch_size, md.global_scratch_align],
            "profile_scratch": [md.profile_scratch_size, md.profile_scratch_align], "arch": job["arch"]}
    return compiled.asm["cubin"], meta


def _worker(folder: Path) -> int:
    """Compile the jobs on stdin into ``folder``; one 'done' or 'error' line per job."""
    jobs = json.loads(sys.stdin.read())
    status = 0
    for digest, job in jobs.items():
        try:
            cubin, meta = _compile_job(job, folder)
        except Exception as exc:                       # noqa: BLE001 - reported to the parent
            message = str(exc).strip().splitlines()
            print(f"error {job['function']} for sm_{job['arch']}: {message[-1] if message else type(exc).__name__}",
                  flush=True)
            status = 1
            continue
        tmp = folder / f"{digest}.tmp"
        tmp.write_bytes(cubin)
        os.replace(tmp, folder / f"{digest}.cubin")
        tmp.write_text(json.dumps(meta, sort_keys=True))
        os.replace(tmp, folder / f"{digest}.json")
        print(f"done {digest}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1])))
