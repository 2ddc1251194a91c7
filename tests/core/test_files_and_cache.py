"""Tests of seeding, atomic writes, pickle loading, content keys and the disk cache (no model)."""

from __future__ import annotations

import os
import pickle
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.core.files_and_cache import (
    ArtifactError,
    DiskCache,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_pickle,
    atomic_write_text,
    content_key,
    file_digest,
    ensure_writable_dir,
    load_pickle,
    set_deterministic,
)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- atomic writes ----------------------------------------------------------------------------
def test_atomic_write_block_raising_leaves_no_file_and_no_temp(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            assert tmp.parent == tmp_path and tmp != target
            raise RuntimeError("boom")
    assert not target.exists()
    assert _entries(tmp_path) == []


def test_atomic_write_failing_serialisation_leaves_no_file(tmp_path):
    target = tmp_path / "bad.json"
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    assert _entries(tmp_path) == []


def test_atomic_write_raising_keeps_previous_content(tmp_path):
    target = tmp_path / "keep.txt"
    atomic_write_text(target, "old")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise ValueError("interrupted")
    assert target.read_text() == "old"
    assert _entries(tmp_path) == ["keep.txt"]


def test_atomic_write_replaces_existing_file_atomically(tmp_path):
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, b"first version")
    old_inode = target.stat().st_ino
    with open(target, "rb") as reader:  # a reader that opened the old file keeps seeing it whole
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"second")
            # until the block ends the final name still holds the complete old content
            assert target.read_bytes() == b"first version"
        assert reader.read() == b"first version"
    assert target.read_bytes() == b"second"
    assert target.stat().st_ino != old_inode  # renamed into place, not rewritten in place
    assert _entries(tmp_path) == ["data.bin"]


def test_atomic_writers_round_trip(tmp_path):
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    atomic_write_json(tmp_path / "j.json", {"b": np.int64(2), "a": [np.float32(0.5)], "s": {3, 1}})
    atomic_write_pickle(tmp_path / "p.pkl", {"k": (1, 2)})
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    import json

    assert json.loads((tmp_path / "j.json").read_text()) == {"b": 2, "a": [0.5], "s": [1, 3]}
    assert load_pickle(tmp_path / "p.pkl") == {"k": (1, 2)}
    assert _entries(tmp_path) == ["j.json", "p.pkl", "t.txt"]


def test_atomic_write_creates_missing_parent_folders(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    atomic_write_text(target, "x")
    assert target.read_text() == "x"


# ---- load_pickle -------------------------------------------------------------------------------
def test_load_pickle_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.pkl"
    with pytest.raises(ArtifactError) as info:
        load_pickle(missing, what="stage-1 cache")
    msg = str(info.value)
    assert str(missing) in msg and "does not exist" in msg and "stage-1 cache" in msg


@pytest.mark.parametrize("payload", [b"", b"not a pickle at all", pickle.dumps(list(range(100)))[:20]])
def test_load_pickle_corrupt_file_names_path(tmp_path, payload):
    bad = tmp_path / "corrupt.pkl"
    bad.write_bytes(payload)
    with pytest.raises(ArtifactError) as info:
        load_pickle(bad)
    assert str(bad) in str(info.value)
    assert "unreadable" in str(info.value)


def test_load_pickle_folder_is_not_a_file(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_pickle(tmp_path)


# ---- ensure_writable_dir -----------------------------------------------------------------------
def test_ensure_writable_dir_creates_nested_folder(tmp_path):
    p = ensure_writable_dir(tmp_path / "x" / "y")
    assert p == tmp_path / "x" / "y" and p.is_dir()


def test_ensure_writable_dir_unwritable_names_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            # running as root: permission bits are bypassed, so use a path below a regular
            # FILE instead, which cannot be created by anyone.
            blocker = tmp_path / "regular_file"
            blocker.write_text("x")
            target = blocker / "sub"
        else:
            target = locked / "sub"
        with pytest.raises(ArtifactError) as info:
            ensure_writable_dir(target, what="--output_dir")
        assert str(target) in str(info.value)
        assert "--output_dir" in str(info.value)
    finally:
        locked.chmod(stat.S_IRWXU)


def test_ensure_writable_dir_existing_readonly_folder(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running with permission bypass (root): a 0o500 folder is writable")
        with pytest.raises(ArtifactError, match="not writable") as info:
            ensure_writable_dir(locked)
        assert str(locked) in str(info.value)
    finally:
        locked.chmod(stat.S_IRWXU)


def test_ensure_writable_dir_path_is_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ArtifactError) as info:
        ensure_writable_dir(f)
    assert str(f) in str(info.value)
    assert f.read_text() == "x"  # the file is left alone


# ---- file_digest -------------------------------------------------------------------------------
def test_file_digest_matches_hashlib_over_several_blocks(tmp_path):
    import hashlib

    data = os.urandom((1 << 22) + 12345)  # more than one read block
    f = tmp_path / "blob.bin"
    f.write_bytes(data)
    assert file_digest(f) == hashlib.sha256(data).hexdigest()
    assert file_digest(f, "sha1") == hashlib.sha1(data).hexdigest()


# ---- content_key -------------------------------------------------------------------------------
def test_content_key_stable_across_dict_order():
    a = content_key({"model": "m", "layers": [1, 2], "cfg": {"x": 1, "y": 2}}, "prompts")
    b = content_key({"cfg": {"y": 2, "x": 1}, "layers": [1, 2], "model": "m"}, "prompts")
    assert a == b
    assert len(a) == 64 and all(c in "0123456789abcdef" for c in a)
    assert content_key({"a": 1}) == content_key({"a": 1})  # deterministic


@pytest.mark.parametrize(
    "other",
    [({"model": "m", "layers": [2, 1]},), ({"model": "m2", "layers": [1, 2]},), ({"model": "m", "layers": [1, 2]}, "x"),
     ({"model": "m", "layers": [1, 2, 3]},)],
)
def test_content_key_differs_for_different_inputs(other):
    assert content_key({"model": "m", "layers": [1, 2]}) != content_key(*other)


def test_content_key_handles_numpy_and_paths():
    assert content_key(np.int64(3), Path("/a/b")) == content_key(3, "/a/b")


# ---- DiskCache -----------------------------------------------------------------------------------
def test_disk_cache_computes_once_across_instances(tmp_path):
    calls = []

    def fn():
        calls.append(1)
        return {"answer": [1, 2, 3]}

    parts = {"prompt": "1+1=", "model": "smollm2"}
    first = DiskCache(tmp_path, "gen").get_or_compute(parts, fn)
    second = DiskCache(tmp_path, "gen").get_or_compute(dict(reversed(list(parts.items()))), fn)
    assert first == second == {"answer": [1, 2, 3]}
    assert len(calls) == 1
    # a different key computes again; another namespace is a different cache
    DiskCache(tmp_path, "gen").get_or_compute({"prompt": "2+2="}, fn)
    DiskCache(tmp_path, "other").get_or_compute(parts, fn)
    assert len(calls) == 3


def test_disk_cache_caches_none_values(tmp_path):
    calls = []
    cache = DiskCache(tmp_path)
    for _ in range(2):
        assert cache.get_or_compute(["k"], lambda: calls.append(1)) is None
    assert len(calls) == 1


def test_disk_cache_corrupt_entry_is_a_miss(tmp_path):
    calls = []

    def fn():
        calls.append(1)
        return 42

    cache = DiskCache(tmp_path)
    assert cache.get_or_compute(("x", 1), fn) == 42
    key = content_key(("x", 1))
    entry = cache._path(key)
    assert entry.is_file()
    entry.write_bytes(b"\x80garbage")
    assert cache.get(key, "missing") == "missing"
    assert DiskCache(tmp_path).get_or_compute(("x", 1), fn) == 42
    assert len(calls) == 2
    assert load_pickle(entry) == 42  # rewritten whole
    assert DiskCache(tmp_path).get_or_compute(("x", 1), fn) == 42
    assert len(calls) == 2


def test_disk_cache_get_put_contains(tmp_path):
    cache = DiskCache(tmp_path, "ns")
    key = content_key("k")
    assert key not in cache and cache.get(key, "d") == "d"
    cache.put(key, [1])
    assert key in cache and cache.get(key) == [1]
    assert (tmp_path / "ns").is_dir()


# ---- set_deterministic ---------------------------------------------------------------------------
def _draws():
    return (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randint(0, 10**6, (2,)).tolist())


def test_set_deterministic_same_seed_same_draws():
    set_deterministic(1234)
    a = _draws()
    set_deterministic(1234)
    b = _draws()
    assert a == b


def test_set_deterministic_other_seed_other_draws():
    set_deterministic(1)
    a = _draws()
    set_deterministic(2)
    b = _draws()
    assert a[0] != b[0]
    assert a[1] != b[1]
    assert a[2] != b[2]


def test_set_deterministic_large_seed():
    set_deterministic(2**40 + 5)
    a = _draws()
    set_deterministic(2**40 + 5)
    assert _draws() == a


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask_like_a_plain_open(tmp_path, umask, mode):
    from lib.core.files_and_cache import atomic_write_json, atomic_write_pickle, default_dir_mode, write_csv_atomic
    import pandas as pd

    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
        atomic_write_json(tmp_path / "a.json", {"a": 1})
        atomic_write_pickle(tmp_path / "a.pkl", [1])
        write_csv_atomic(pd.DataFrame({"a": [1]}), tmp_path / "a.csv")
        (tmp_path / "plain_dir").mkdir()
        dir_mode = default_dir_mode()
    finally:
        os.umask(old)
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert plain == mode
    for name in ("a.json", "a.pkl", "a.csv"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == plain, name
    assert dir_mode == stat.S_IMODE((tmp_path / "plain_dir").stat().st_mode)
