"""The .llmc container: round trip, alignment, determinism, and a clear error for every kind of
damage (truncation, a flipped byte anywhere, a future format, a machine without the features)."""

import numpy as np
import pytest

from llmc.artifact import (FORMAT_VERSION, HEADER_SIZE, SECTION_ALIGN, TENSOR_ALIGN, ArtifactError,
                           read_artifact, write_artifact)

rng = np.random.default_rng()
MANIFEST = {"target": {"name": "cpu"}, "requires": {"cpu_features": ["avx2", "fma"]},
            "entry_points": {"decode": {"tokens": "i64[1]"}}}


def weights():
    return {"embed": rng.standard_normal((7, 5)).astype(np.float32),       # 140 bytes: not aligned
            "norm": rng.standard_normal(5).astype(np.float32),
            "ids": np.arange(3, dtype=np.int64),
            "codes": rng.integers(0, 255, (3, 9), dtype=np.uint8), "signed": rng.integers(-9, 9, (2, 5), dtype=np.int8),
            "half": rng.standard_normal((4, 3)).astype(np.float16)}


def write(path, w=None, manifest=MANIFEST):
    w = weights() if w is None else w
    write_artifact(path, manifest, {"code": b"\x7fELF pretend library", "tokenizer": b'{"model": {}}'}, w)
    return w


HAVE = {"avx2", "fma", "sse2"}


def test_round_trip(tmp_path):
    w = write(tmp_path / "m.llmc")
    art = read_artifact(tmp_path / "m.llmc", features=HAVE)
    assert art.manifest["target"] == {"name": "cpu"} and art.manifest["format_version"] == FORMAT_VERSION
    assert bytes(art.section("code")) == b"\x7fELF pretend library"
    got = art.weights()
    for name, array in w.items():
        np.testing.assert_array_equal(got[name], array)
        assert got[name].dtype == array.dtype and not got[name].flags.owndata   # a view of the mapped file
    for entry in art.manifest["sections"].values():
        assert entry["offset"] % SECTION_ALIGN == 0
    assert all(t["offset"] % TENSOR_ALIGN == 0 for t in art.manifest["tensors"].values())
    with pytest.raises(ArtifactError, match="no 'kernels' section"):
        art.section("kernels")


def test_writing_is_deterministic(tmp_path):
    w = weights()
    write(tmp_path / "a.llmc", w)
    write(tmp_path / "b.llmc", w)
    assert (tmp_path / "a.llmc").read_bytes() == (tmp_path / "b.llmc").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.llmc", "b.llmc"]   # no temporaries left


def damaged(tmp_path, change):
    path = tmp_path / "m.llmc"
    write(path)
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(change(data)))
    return path


def flip(offset):
    def change(data):
        data[offset] ^= 0x40
        return data
    return change


@pytest.mark.parametrize("change, message", [
    (lambda d: d[: len(d) // 2], "truncated"),
    (lambda d: d[:40], "truncated"),
    (lambda d: d[:10], "too short"),
    (flip(0), "not an llmc artifact"),
    (flip(HEADER_SIZE + 5), "manifest's checksum"),
    (flip(SECTION_ALIGN + 3), "section 'code' does not match its checksum"),
    (flip(2 * SECTION_ALIGN + 1), "section 'tokenizer' does not match its checksum"),
    (flip(3 * SECTION_ALIGN + 100), "section 'weights' does not match its checksum"),
    (lambda d: d[:8] + (FORMAT_VERSION + 1).to_bytes(4, "little") + d[12:], "newer than this llmc reads"),
])
def test_damage_is_a_clear_error(tmp_path, change, message):
    path = damaged(tmp_path, change)
    with pytest.raises(ArtifactError, match=message) as info:
        read_artifact(path, features=HAVE)
    assert str(path) in str(info.value)


def test_missing_cpu_features_are_named(tmp_path):
    write(tmp_path / "m.llmc")
    with pytest.raises(ArtifactError, match="needs CPU features fma that this machine lacks"):
        read_artifact(tmp_path / "m.llmc", features={"avx2"})


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="cannot open"):
        read_artifact(tmp_path / "nothing.llmc")
