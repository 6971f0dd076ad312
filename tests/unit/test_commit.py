"""Whole-stage atomic outputs: old or new after any kill, never a mix; leftovers cleaned; disk full."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmpipe import commit
from mmpipe.commit import DiskFull, recover, staged_dir

REPO = Path(__file__).resolve().parents[2]


def _write_version(d: Path, tag: str, n: int = 5) -> None:
    for i in range(n):
        (d / f"part-{i}.txt").write_text(f"{tag}-{i}\n")
    (d / "manifest.json").write_text(f'{{"version": "{tag}"}}\n')


def _snapshot(d: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(d.iterdir())} if d.exists() else {}


def _siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.parent.iterdir() if p.name != d.name)


def test_first_version_and_replacement_leave_no_leftovers(tmp_path):
    out = tmp_path / "shards"
    with staged_dir(out) as staging:
        assert staging.parent == out.parent and not out.exists()
        _write_version(staging, "v1")
    assert _snapshot(out)["manifest.json"] == '{"version": "v1"}\n'
    with staged_dir(out) as staging:
        _write_version(staging, "v2", n=3)  # the new version has fewer files: none may survive
        assert _snapshot(out)["manifest.json"] == '{"version": "v1"}\n'  # readers see v1 until done
    snap = _snapshot(out)
    assert set(snap) == {"part-0.txt", "part-1.txt", "part-2.txt", "manifest.json"}
    assert all("v2" in text for text in snap.values())
    assert _siblings(out) == []


def test_error_inside_keeps_the_old_version(tmp_path):
    out = tmp_path / "ingest"
    with staged_dir(out) as staging:
        _write_version(staging, "v1")
    with pytest.raises(RuntimeError), staged_dir(out) as staging:
        _write_version(staging, "v2")
        raise RuntimeError("stage failed half way")
    assert _snapshot(out)["manifest.json"] == '{"version": "v1"}\n'
    assert _siblings(out) == []


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with staged_dir(tmp_path / "out") as staging:
            (staging / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


_KILL_SCRIPT = """
import sys
from pathlib import Path
from mmpipe import commit
if {no_exchange}:
    commit._exchange = lambda a, b: False
out = Path(sys.argv[1])
with commit.staged_dir(out) as staging:
    for i in range(3):
        (staging / f"part-{{i}}.txt").write_text(f"v2-{{i}}\\n")
    (staging / "manifest.json").write_text('{{"version": "v2"}}\\n')
"""


@pytest.mark.parametrize(
    ("point", "no_exchange"),
    [
        ("commit:before-switch", False),
        ("commit:after-switch", False),
        ("commit:before-switch", True),
        ("commit:between-renames", True),
    ],
)
def test_kill9_at_each_boundary_leaves_old_or_new(tmp_path, point, no_exchange):
    out = tmp_path / "shards"
    with staged_dir(out) as staging:
        _write_version(staging, "v1")
    old = _snapshot(out)
    script = textwrap.dedent(_KILL_SCRIPT.format(no_exchange=no_exchange))
    env = {**os.environ, "MMPIPE_FAULT": point}
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, env=env)
    assert proc.returncode == -signal.SIGKILL
    recover(out)  # what the next run does first
    new = _snapshot(out)
    assert new == old or new == {
        "part-0.txt": "v2-0\n",
        "part-1.txt": "v2-1\n",
        "part-2.txt": "v2-2\n",
        "manifest.json": '{"version": "v2"}\n',
    }
    assert _siblings(out) == [], "recover() must remove what the killed run left"
    # and the rerun completes normally
    subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, check=True)
    assert _snapshot(out)["manifest.json"] == '{"version": "v2"}\n'


def test_recover_leaves_a_live_runs_staging_alone(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".shards.staging-{commit._host()}-{sleeper.pid}-abcd"
        dead = tmp_path / f".shards.staging-{commit._host()}-999999999-abcd"
        other_host = tmp_path / ".shards.staging-elsewhere-1-abcd"
        for d in (live, dead, other_host):
            d.mkdir()
        recover(out)
        assert live.is_dir() and other_host.is_dir() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_enospc_inside_raises_diskfull_and_keeps_old(tmp_path):
    out = tmp_path / "shards"
    with staged_dir(out) as staging:
        _write_version(staging, "v1")
    full = pytest.raises(DiskFull, match=r"shards: no space left on device.*intact")
    with full, staged_dir(out) as staging:
        (staging / "part-0.txt").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(staging / "part-1.txt"))
    assert _snapshot(out)["manifest.json"] == '{"version": "v1"}\n'
    assert _siblings(out) == []


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if shutil.which("mount") is None:
        return False
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return res.returncode == 0


def test_real_full_disk_on_a_small_tmpfs(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        out = disk / "shards"
        with staged_dir(out) as staging:
            (staging / "old.bin").write_bytes(b"o" * 300_000)
        with pytest.raises(DiskFull, match="no space left"), staged_dir(out) as staging:
            (staging / "new.bin").write_bytes(b"n" * 2_000_000)
        assert (out / "old.bin").stat().st_size == 300_000
        assert _siblings(out) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)
