"""resolve_inside: the data-root guard must answer exactly as a full resolve() would."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
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


def test_killed_writes_leave_temps_that_remove_temps_finds(tmp_path):
    import subprocess
    import sys

    from mmpipe.io import atomic_path, remove_temps, scratch_dir

    keep = tmp_path / "last.pt"
    keep.write_text("previous")
    script = (
        "import os, signal, sys\n"
        "from mmpipe.io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(keep)], check=False)
    assert keep.read_text() == "previous"  # the kill left the old file...
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # ...and a temp
    assert remove_temps(tmp_path) == leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    with pytest.raises(RuntimeError), atomic_path(keep) as tmp:  # an error cleans up at once
        tmp.write_text("new")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), scratch_dir(tmp_path / ".work") as work:
        (work / "x").write_text("x")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
