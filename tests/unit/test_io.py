"""resolve_inside: the data-root guard must answer exactly as a full resolve() would."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from mmpipe.io import resolve_inside


def reference(root: Path, relative: str) -> Path | None:
    root_path = root.resolve()
    candidate = (root_path / relative).resolve()
    if candidate == root_path or root_path not in candidate.parents:
        return None
    return candidate


def make_tree(base: Path) -> Path:
    root = base / "root"
    (root / "images" / "sub").mkdir(parents=True, exist_ok=True)
    (base / "outside").mkdir(exist_ok=True)
    for f in (
        root / "images" / "a.jpg",
        root / "images" / "sub" / "b.jpg",
        base / "outside" / "x.jpg",
    ):
        f.write_bytes(b"x")
    links = {
        root / "images" / "out.jpg": base / "outside" / "x.jpg",  # file link escaping
        root / "images" / "in.jpg": root / "images" / "a.jpg",  # file link staying inside
        root / "escape": base / "outside",  # directory link escaping
        root / "alias": root / "images",  # directory link staying inside
    }
    for link, target in links.items():
        if not link.is_symlink():
            os.symlink(target, link)
    return root


PARTS = [
    "images",
    "sub",
    "a.jpg",
    "b.jpg",
    "out.jpg",
    "in.jpg",
    "escape",
    "alias",
    "x.jpg",
    "..",
    ".",
    "missing.jpg",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PARTS), min_size=1, max_size=5), st.booleans())
def test_resolve_inside_matches_a_full_resolve(tmp_path_factory, parts, absolute):
    base = tmp_path_factory.getbasetemp() / "tree"
    base.mkdir(exist_ok=True)
    root = make_tree(base)
    relative = "/".join(parts)
    if absolute:
        relative = str(root / relative)
    assert resolve_inside(root, relative) == reference(root, relative), relative


def test_known_cases(tmp_path):
    root = make_tree(tmp_path)
    assert resolve_inside(root, "images/a.jpg") == (root / "images" / "a.jpg").resolve()
    assert resolve_inside(root, "images/in.jpg") == (root / "images" / "a.jpg").resolve()
    assert resolve_inside(root, "alias/sub/b.jpg") == (root / "images" / "sub" / "b.jpg").resolve()
    for bad in (
        "images/out.jpg",
        "escape/x.jpg",
        "../outside/x.jpg",
        "/etc/passwd",
        "",
        ".",
        "images/..",
    ):
        assert resolve_inside(root, bad) is None, bad


def test_outputs_respect_the_umask(tmp_path):
    from mmpipe.io import write_json_atomic

    old = os.umask(0o002)  # a group-shared project
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o664


def test_stale_temps_are_removed_but_never_a_live_runs(tmp_path):
    import fcntl

    from mmpipe.io import atomic_path, locked_temp_dir, remove_stale_temps

    old = 1_000_000_000  # an mtime long past the grace period
    stale_file = tmp_path / ".records.parquet.abc.tmp"
    stale_file.write_bytes(b"half")
    stale_dir = tmp_path / ".shard-tmp.dead.tmp"
    (stale_dir).mkdir()
    (stale_dir / ".lock").write_bytes(b"")
    (stale_dir / "train-000000.tar").write_bytes(b"x")
    for path in (stale_file, stale_dir):
        os.utime(path, (old, old))
    keep = tmp_path / "manifest.json"
    keep.write_text("{}")
    with locked_temp_dir(tmp_path, ".shard-tmp.") as live_dir, atomic_path(tmp_path / "b") as live:
        live.write_bytes(b"being written")
        os.utime(live_dir, (old, old))  # old, but its writer holds the lock
        os.utime(live, (old, old))
        removed = remove_stale_temps(tmp_path)
        assert sorted(removed) == sorted([stale_file.name, stale_dir.name])
        assert live_dir.is_dir() and live.is_file() and keep.is_file()
        fd = os.open(live_dir / ".lock", os.O_RDONLY)  # still locked by its owner
        try:
            import pytest

            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert {p.name for p in tmp_path.iterdir()} == {"manifest.json", "b"}
