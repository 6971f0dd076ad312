"""Incremental ingest: a night that appends records decodes only the new images (the image
checks of earlier nights are reused by content, ``incremental.CheckCache``) and writes the very
bytes a from-scratch ingest writes."""

from __future__ import annotations

from pathlib import Path

import pytest

import mmpipe.ingest as ingest
from mmpipe.config import IngestParams
from mmpipe.incremental import CHECKS
from tests.unit.test_ingest import _corrupt_png, _csv, _image_bytes, _truncated_jpeg, _write

GOOD = 20


def _collection(root: Path, n_good: int) -> list[tuple[str, str]]:
    """``n_good`` distinct images, a few bad ones and a PNG named .jpg; their caption rows."""
    rows = []
    for i in range(n_good):
        _write(root, f"images/{i:03d}.jpg", _image_bytes(seed=i, noise=True))
        rows.append((f"images/{i:03d}.jpg", f"picture number {i}"))
    bad = {
        "images/broken.png": _corrupt_png(),
        "images/cut.jpg": _truncated_jpeg(),
        "images/thin.jpg": _image_bytes(size=(4, 30), seed=99),
        "images/really_png.jpg": _image_bytes("PNG", seed=98),
        "images/copy.jpg": _image_bytes(seed=0, noise=True),  # same bytes as 000.jpg
    }
    for rel, data in bad.items():
        _write(root, rel, data)
        rows.append((rel, f"caption of {rel}"))
    return [*rows, ("images/gone.jpg", "its file does not exist")]


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """Counts the image decodes (workers=1: the check runs in this process)."""
    calls: list[int] = []
    real = ingest._decode_checks

    def counting(data, *args):
        calls.append(len(data))
        return real(data, *args)

    monkeypatch.setattr(ingest, "_decode_checks", counting)
    return calls


def _run(root: Path, out: Path, cache: Path | None, **kw) -> dict:
    """Ingest in decode mode: the decodes these tests count and reuse (the header default
    decodes only a file without its end marker)."""
    params = IngestParams(source="folder", root=str(root), workers=1, image_check="decode", **kw)
    return ingest.run_ingest(params, out, cache)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_a_grown_collection_decodes_only_new_images_and_equals_from_scratch(tmp_path, decodes):
    root, cache = tmp_path / "data", tmp_path / "state" / CHECKS
    rows = _collection(root, GOOD)
    _csv(root, rows)
    first = _run(root, tmp_path / "night1", cache)
    n_contents = GOOD + 4  # 20 good + broken, cut, thin, png (copy.jpg has 000's bytes)
    assert first["image_checks"] == {"checked": GOOD + 6, "reused": 0}
    assert len(decodes) == n_contents + 1  # copy.jpg: its bytes decoded once more, uncached

    # night 2: 10 % new images; one old file renamed (same bytes); one changed in place
    for i in (GOOD, GOOD + 1):
        _write(root, f"images/{i:03d}.jpg", _image_bytes(seed=i, noise=True))
        rows.append((f"images/{i:03d}.jpg", f"picture number {i}"))
    (root / "images/005.jpg").rename(root / "images/moved.jpg")
    rows = [("images/moved.jpg", r[1]) if r[0] == "images/005.jpg" else r for r in rows]
    _write(root, "images/007.jpg", _image_bytes(seed=107, noise=True))
    _csv(root, rows)
    decodes.clear()
    second = _run(root, tmp_path / "night2", cache)
    assert len(decodes) == 3  # the two new images and the one changed in place
    assert second["image_checks"] == {"checked": 4, "reused": GOOD + 4}  # + gone.jpg, uncached
    scratch = _run(root, tmp_path / "scratch", None)
    assert _files(tmp_path / "night2") == _files(tmp_path / "scratch")
    assert second["images"] == scratch["images"] and second["images"]["rejected"] == 4

    decodes.clear()  # other check settings: the cache is not used
    other = _run(root, tmp_path / "night3", cache, min_side=6)
    assert other["image_checks"]["reused"] == 0 and len(decodes) == n_contents + 3


def test_an_unreadable_cache_is_a_cold_run(tmp_path, decodes):
    root, cache = tmp_path / "data", tmp_path / CHECKS
    _csv(root, _collection(root, 3))
    cache.write_bytes(b"not parquet")
    report = _run(root, tmp_path / "out", cache)
    assert report["image_checks"]["reused"] == 0 and report["images"]["accepted"] == 4
    assert _run(root, tmp_path / "again", cache)["image_checks"]["reused"] == 8
