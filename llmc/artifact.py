"""The .llmc file: one artifact per model and target.

Layout (all integers little-endian)::

    0   header   magic "LLMCART\\0" | format version u32 | header size u32 | manifest size u64
                 | manifest sha256 (32 bytes) | zero padding to HEADER_SIZE
    64  manifest JSON (UTF-8, sorted keys): model config, entry points, target and required
                 features, quantization scheme, llmc version, input hashes, and the section
                 table: name -> {offset, size, sha256}
    ... sections, each aligned to SECTION_ALIGN (a page) so the weights can be memory-mapped;
        within "weights" every tensor starts at a TENSOR_ALIGN boundary and is listed in the
        manifest's "tensors" table: name -> {dtype, shape, offset, nbytes}

Writing is deterministic (no timestamps, sorted JSON) and atomic: a hidden temporary file, locked
while it is written, renamed into place with the mode the umask gives; an error, Ctrl-C or (in the
CLI) SIGTERM/SIGHUP removes it, and the next write to the same path removes one a killed writer
left. Reading checks the magic, the version, every size against the file and every checksum
before anything is used, so a corrupt or truncated artifact is an ArtifactError, never a crash.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import mmap
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from llmc.errors import LlmcError, is_int
from llmc.ir import numpy_dtype
from llmc.manifest import ManifestError, check_container

MAGIC = b"LLMCART\0"
FORMAT_VERSION = 2         # 2: the batched, paged step of llmc.abi (1: one sequence, a contiguous cache)
HEADER_SIZE = 64
SECTION_ALIGN = 4096
TENSOR_ALIGN = 64
_HEADER = struct.Struct("<8sIIQ32s")
NUMPY_NATIVE = ("f64", "f32", "f16", "i64", "i32", "i16", "i8", "u8", "bool")   # others come back as raw bytes


class ArtifactError(LlmcError):
    """An artifact that cannot be used: corrupt, truncated, from a newer llmc, or for another machine."""


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a whole file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def pack_weights(weights: Mapping[str, np.ndarray], dtypes: Mapping[str, str]) -> tuple[list, dict]:
    """(chunks to write, tensor table) for the weights section, in the order of the names (which
    the reader checks: ``llmc.manifest.check_tensors``)."""
    chunks, table, offset = [], {}, 0
    for name, array in sorted(weights.items()):
        array = np.ascontiguousarray(array).reshape(np.shape(array))    # (ascontiguousarray makes 0-d 1-d)
        padding = _align(offset, TENSOR_ALIGN) - offset
        if padding:
            chunks.append(b"\0" * padding)
            offset += padding
        table[name] = {"dtype": dtypes[name], "shape": list(array.shape), "offset": offset, "nbytes": array.nbytes}
        chunks.append(memoryview(array).cast("B"))
        offset += array.nbytes
    return chunks, table


def write_artifact(path: str | Path, manifest: Mapping[str, Any], sections: Mapping[str, Any],
                   weights: Mapping[str, np.ndarray] | None = None,
                   weight_dtypes: Mapping[str, str] | None = None) -> None:
    """Write an artifact. ``sections`` maps names to bytes; ``weights`` become the "weights" section."""
    blobs: dict[str, list] = {name: [bytes(data)] for name, data in sections.items()}
    manifest = dict(manifest)
    if weights is not None:
        dtypes = weight_dtypes or {}
        chunks, table = pack_weights(weights, {n: dtypes.get(n) or _dtype_name(a) for n, a in weights.items()})
        blobs["weights"] = chunks
        manifest["tensors"] = table
    # Section offsets depend on the manifest's size, which depends on the offsets: lay the
    # sections out after a manifest size bound, and pad the manifest to exactly that size.
    table = {}
    for name, chunks in blobs.items():
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
        table[name] = {"size": sum(len(c) if isinstance(c, bytes) else c.nbytes for c in chunks),
                       "sha256": digest.hexdigest()}
    manifest["format_version"] = FORMAT_VERSION
    manifest["sections"] = table
    reserve = _align(len(_encode(manifest, {n: 0 for n in table})) + 64 * len(table) + 256, 256)
    offset = _align(HEADER_SIZE + reserve, SECTION_ALIGN)
    for name in blobs:
        table[name]["offset"] = offset
        offset = _align(offset + table[name]["size"], SECTION_ALIGN)
    encoded = _encode(manifest, None)
    if len(encoded) > reserve:
        raise AssertionError("artifact manifest outgrew its reserved space")
    encoded = encoded + b" " * (reserve - len(encoded))
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, len(encoded), hashlib.sha256(encoded).digest())
    path = Path(path)
    check_output(path)
    remove_stale(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent or ".")
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)     # held while writing: remove_stale leaves it alone
            os.fchmod(f.fileno(), 0o666 & ~_umask())   # what open() would give, not mkstemp's 0600
            f.write(header.ljust(HEADER_SIZE, b"\0"))
            f.write(encoded)
            for name, chunks in blobs.items():
                f.write(b"\0" * (table[name]["offset"] - f.tell()))
                for chunk in chunks:
                    f.write(chunk)
            f.write(b"\0" * (_align(f.tell(), SECTION_ALIGN) - f.tell()))
            f.flush()
            os.replace(tmp, path)
    except BaseException as exc:        # an error, Ctrl-C, or SIGTERM/SIGHUP as the CLI raises them
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):    # a full disk, a read-only folder: the old file is untouched
            raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


TEMP_SUFFIX = ".partial"


def check_output(path: str | Path) -> None:
    """Refuse, before any work, an output path that cannot become an artifact: a folder that
    does not exist or cannot be written, or a path that is a folder, a FIFO or another file that
    is not a regular one."""
    path = Path(path)
    folder = path.resolve().parent
    if not folder.is_dir():
        raise ArtifactError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write {path}: the folder {folder} is not writable")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ArtifactError(f"cannot write {path}: it is {kind}; name a file")


def remove_stale(path: Path) -> None:
    """Remove the temporary files of earlier writes of ``path`` that died without cleaning up
    (SIGKILL, a power cut): those no live writer holds locked."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"):
        try:
            fd = os.open(stale, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)      # fails while its writer lives
                stale.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _encode(manifest: Mapping[str, Any], offsets) -> bytes:
    if offsets is not None:
        manifest = dict(manifest, sections={n: dict(s, offset=offsets[n]) for n, s in manifest["sections"].items()})
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def _dtype_name(array: np.ndarray) -> str:
    from llmc.ir import dtype_of_array

    return dtype_of_array(array)


@dataclass
class Artifact:
    path: Path
    manifest: dict
    _map: mmap.mmap

    def section(self, name: str) -> memoryview:
        entry = self.manifest["sections"].get(name)
        if entry is None:
            raise ArtifactError(f"{self.path} has no {name!r} section; it holds {', '.join(self.manifest['sections'])}")
        return memoryview(self._map)[entry["offset"]: entry["offset"] + entry["size"]]

    def weights(self) -> dict[str, np.ndarray]:
        """Every tensor as a read-only numpy view of the mapped file (nothing is copied). Tensors whose
        dtype numpy lacks (bf16, quantized blocks) come back as their raw bytes (uint8)."""
        base = self.manifest["sections"]["weights"]["offset"]
        out = {}
        for name, t in self.manifest.get("tensors", {}).items():
            raw = t["dtype"] not in NUMPY_NATIVE
            dtype = np.dtype(np.uint8 if raw else numpy_dtype(t["dtype"]))
            array = np.frombuffer(self._map, dtype=dtype, count=t["nbytes"] // dtype.itemsize, offset=base + t["offset"])
            out[name] = array if raw else array.reshape(t["shape"])
        return out

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:         # views of the weights are still alive: the map goes with them
            pass


def host_cpu_features() -> set[str]:
    """The CPU's feature flags as the kernel names them (x86 "flags", Arm "Features")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def check_machine(manifest: Mapping[str, Any], path: Path, features: set[str] | None = None) -> None:
    """Refuse an artifact whose required CPU features this machine lacks."""
    need = manifest.get("requires", {}).get("cpu_features", [])
    have = host_cpu_features() if features is None else features
    missing = [f for f in need if f not in have]
    if missing:
        raise ArtifactError(f"{path} needs CPU features {', '.join(missing)} that this machine lacks: rebuild it "
                            "here, or for a lower CPU feature level")


def read_artifact(path: str | Path, verify: bool = True, features: set[str] | None = None,
                  machine: bool = True) -> Artifact:
    """Open an artifact; check its header, manifest, (with ``verify``) every section's checksum, and
    (with ``machine``) that this machine has the CPU features it requires (``features`` overrides
    the host's, for tests)."""
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO named as an artifact is refused below instead of waiting for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
                    "not a regular file"
                raise ArtifactError(f"{path} is {kind}, not an llmc artifact")
            size = st.st_size
            if size < HEADER_SIZE:
                raise ArtifactError(f"{path} is too short to be an llmc artifact ({size} bytes); is it truncated?")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ArtifactError(f"cannot open {path}: {exc.strerror or exc}") from None
    magic, version, header_size, manifest_size, manifest_hash = _HEADER.unpack_from(mapped, 0)
    if magic != MAGIC:
        raise ArtifactError(f"{path} is not an llmc artifact (its first bytes are not {MAGIC!r})")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format version {version}, newer than this llmc reads "
                            f"({FORMAT_VERSION}): upgrade llmc, or rebuild the artifact with this version")
    if version < 1 or header_size != HEADER_SIZE:
        raise ArtifactError(f"{path} has an unknown header (format version {version}); rebuild it")
    if version < FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format version {version}, from an older llmc (one sequence over a "
                            f"contiguous KV cache); this llmc runs version {FORMAT_VERSION}: rebuild it with "
                            "`llmc compile`")
    if header_size + manifest_size > size:
        raise ArtifactError(f"{path} is truncated: its manifest ends at byte {header_size + manifest_size} "
                            f"but the file has {size} bytes")
    encoded = mapped[header_size: header_size + manifest_size]
    if hashlib.sha256(encoded).digest() != manifest_hash:
        raise ArtifactError(f"{path} is corrupt: the manifest's checksum does not match; rebuild the artifact")
    try:
        manifest = json.loads(encoded)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ArtifactError(f"{path} is corrupt: its manifest is not valid JSON; rebuild the artifact") from None
    sections = manifest.get("sections") if isinstance(manifest, dict) else None
    ends = {name: entry.get("offset", 0) + entry.get("size", 0) for name, entry in sections.items()
            if isinstance(entry, dict) and is_int(entry.get("offset", 0)) and is_int(entry.get("size", 0))
            } if isinstance(sections, dict) else {}
    past = [(name, end) for name, end in ends.items() if end > size]
    if past:
        raise ArtifactError(f"{path} is truncated: section {past[0][0]!r} ends at byte {past[0][1]} but the file has "
                            f"{size} bytes")
    try:
        check_container(manifest, size, header_size + manifest_size, version)
    except ManifestError as exc:
        raise ArtifactError(f"{path} has a manifest that is not valid: {exc}. Its checksum matches, so a tool edited "
                            "it; rebuild the artifact (llmc verify checks one)") from None
    for name, entry in manifest["sections"].items():
        end = entry["offset"] + entry["size"]
        if verify and _sha256(memoryview(mapped)[entry["offset"]: end]) != entry["sha256"]:
            raise ArtifactError(f"{path} is corrupt: section {name!r} does not match its checksum; rebuild the artifact")
    if machine:
        check_machine(manifest, path, features)
    return Artifact(path, manifest, mapped)
