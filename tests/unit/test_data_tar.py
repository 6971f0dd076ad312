"""mmpipe.data.TarSamples: the same samples, order and handler calls as webdataset's
``tarfile_samples`` (which it replaced in the loader), on shards with every oddity a tar can carry;
and the loader's batches unchanged by the swap."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmpipe import data
from mmpipe.data import (
    TarSamples,
    create_dataloader,
    decode_image,
    decode_rgb,
    iterate_split,
    to_tensor,
    to_tensor_batch,
)


def _tar(path: Path, members: list[tuple[str, bytes | None]], fmt: int = tarfile.PAX_FORMAT) -> str:
    """A tar of (name, bytes) members; bytes None: a directory."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
                continue
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return str(path)


@pytest.fixture
def odd_shards(tmp_path: Path) -> list[str]:
    """Shards with: plain samples, a sample with no image and an odd (upper-case, two-dot)
    extension, a directory, metadata members, a path inside the key, a name without a dot, a
    duplicate member, a key that runs on into the next shard, a cut shard, a missing one and
    one that is no tar at all."""
    a = _tar(tmp_path / "a.tar", [
        ("s0.jpg", b"j0"), ("s0.txt", b"t0"), ("s0.json", b"{}"),
        ("s1.txt", b"t1"), ("s1.JSON", b"{}"), ("s1.Seg.PNG", b"mask"),  # no image
        ("dir", None), ("__meta__", b"m"), ("__x__/inside.txt", b"m"), ("noext", b"n"),
        ("sub/s2.jpg", b"j2"), ("sub/s2.txt", b"t2"),
        ("s3.jpg", b"j3"), ("s3.jpg", b"dup"), ("s3.txt", b"t3"),
        ("s4.jpg", b"j4"),
    ])  # fmt: skip
    b = _tar(tmp_path / "b.tar", [("s4.txt", b"t4"), ("s5.jpg", b"j5"), ("s5.txt", b"t5")])
    full = Path(_tar(tmp_path / "c-full.tar", [(f"c{i}.jpg", bytes(700)) for i in range(4)]))
    cut = tmp_path / "c.tar"
    cut.write_bytes(full.read_bytes()[: 2048 + 300])  # inside the second member's data
    cut_header = tmp_path / "d.tar"
    cut_header.write_bytes(full.read_bytes()[: 1536 + 300])  # inside the second header: an end
    (tmp_path / "e.tar").write_bytes(b"not a tar at all" * 64)
    long = "d" * 90 + "/" + "k" * 120  # a pax header, a GNU longname, a ustar prefix
    after = _tar(tmp_path / "f.tar", [("f0.jpg", b"jf"), ("f0.txt", b"tf"), (long + ".jpg", b"p")])
    gnu = _tar(tmp_path / "g.tar", [(long + ".jpg", b"g"), ("g1.TXT", b"t")], tarfile.GNU_FORMAT)
    ustar = _tar(tmp_path / "h.tar", [("u" * 90 + "/h0.jpg", b"u")], tarfile.USTAR_FORMAT)
    missing = str(tmp_path / "missing.tar")
    return [a, b, str(cut), str(cut_header), str(tmp_path / "e.tar"), missing, after, gnu, ustar]


class Recorder:
    """A handler that records each error (type and args as text) and says go on / stop."""

    def __init__(self, go_on: bool = True) -> None:
        self.seen: list[tuple[str, str]] = []
        self.go_on = go_on

    def __call__(self, exn: Exception) -> bool:
        self.seen.append((type(exn).__name__, str(exn.args)))
        return self.go_on


def _both(urls: list[str], go_on: bool = True) -> tuple[tuple, tuple]:
    mine, theirs = Recorder(go_on), Recorder(go_on)
    got = list(TarSamples(mine)(iter([{"url": u} for u in urls])))
    want = list(wds.tarfile_samples(iter([{"url": u} for u in urls]), handler=theirs))
    return (got, mine.seen), (want, theirs.seen)


def test_same_samples_order_and_errors_as_webdataset(odd_shards):
    (got, errors), (want, want_errors) = _both(odd_shards)
    assert got == want and errors == want_errors
    # a shard's end ends a sample (s4 twice); a cut shard's partial sample carries on (c0)
    keys = [s["__key__"] for s in got]
    assert keys[:9] == ["s0", "s1", "sub/s2", "s3", "s4", "s4", "s5", "c0", "f0"]
    assert len(keys) == 13 and keys[10][-3:] == "kkk" and keys[12] == "u" * 90 + "/h0"
    assert got[1] == {"__key__": "s1", "__url__": odd_shards[0], "txt": b"t1", "json": b"{}",
                      "seg.png": b"mask"}  # fmt: skip
    assert got[3]["jpg"] == b"j3"  # the duplicate was refused, named
    kinds = [kind for kind, _ in errors]
    # duplicates: s3.jpg, then c0.jpg of the cut c.tar meeting d.tar's first member
    assert kinds == ["ValueError", "ReadError", "ReadError", "ValueError", "ReadError",
                     "FileNotFoundError"]  # fmt: skip
    assert errors[2][1].endswith("c.tar')") and errors[4][1].endswith("e.tar')")


@pytest.mark.parametrize("start", range(9))
def test_same_when_the_handler_stops(odd_shards, start):
    (got, errors), (want, want_errors) = _both(odd_shards[start:], go_on=False)
    assert got == want and errors == want_errors


def _outcome(samples) -> tuple:
    try:
        return ("samples", list(samples))
    except Exception as exn:
        return (type(exn).__name__, str(exn.args))


@pytest.mark.parametrize("shard", range(9))
def test_without_a_handler_the_same_error_is_raised(odd_shards, shard):
    urls = [{"url": odd_shards[shard]}]
    got = _outcome(TarSamples()(iter(urls)))
    assert got == _outcome(wds.tarfile_samples(iter(urls)))
    assert got[0] == ("samples" if shard in (1, 3, 6, 7, 8) else "ReadError" if shard in (2, 4)
                      else "ValueError" if shard == 0 else "FileNotFoundError")  # fmt: skip


def _batches(shards: Path, **kw) -> tuple[list[dict], dict]:
    loader = create_dataloader(shards, "train", 4, max_bad_samples=1, **kw)
    batches = list(loader)
    # an error's text may name an object's address (<_io.BytesIO object at 0x...>)
    bad = [re.sub(r"0x[0-9a-f]+", "0x", item) for item in loader.stats["bad"]]
    return batches, {**loader.stats, "bad": bad}


@pytest.mark.parametrize("kw", [{}, {"shuffle_buffer": 5, "seed": 2, "epoch": 1},
                                {"num_workers": 1, "rank": 1, "world_size": 2}])  # fmt: skip
def test_loader_batches_are_unchanged(make_shards, monkeypatch, kw):
    from tests.unit.test_data import _rewrite_shard

    shards = make_shards({"train": [7, 5, 9]})
    _rewrite_shard(shards, "train-000001.tar",
                   lambda name, b: b"not a jpeg" if name == "train00008.jpg" else b)  # fmt: skip
    got, stats = _batches(shards, **kw)
    monkeypatch.setattr(data, "TarSamples", lambda handler: wds.tarfile_to_samples(handler=handler))
    want, want_stats = _batches(shards, **kw)
    assert stats == want_stats and len(got) == len(want) > 1
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in g:
            if isinstance(g[k], torch.Tensor):
                assert g[k].dtype == w[k].dtype and g[k].stride() == w[k].stride()
                assert torch.equal(g[k].nan_to_num(-9), w[k].nan_to_num(-9)), k
            else:
                assert g[k] == w[k], k


@pytest.mark.parametrize("where", [148, 124, 0])  # checksum, size, name of the second header
def test_a_damaged_header_reads_as_in_webdataset(tmp_path, where):
    path = Path(_tar(tmp_path / "x.tar", [(f"x{i}.jpg", bytes(10)) for i in range(3)]))
    raw = bytearray(path.read_bytes())
    raw[1024 + where] = 0o200 if where == 124 else ord("9")  # base-256 size / not octal / name
    path.write_bytes(bytes(raw))
    (got, errors), (want, want_errors) = _both([str(path)])
    assert got == want and errors == want_errors and got[0]["__key__"] == "x0"


def test_batches_hold_each_samples_decode_image(make_shards):
    """The loader converts whole batches of uint8 pixels; the values and layout are those of
    ``decode_image`` (predict's path) on each stored JPEG."""
    shards = make_shards({"train": [7, 5, 9]})
    stored = {s["__key__"]: s["jpg"] for s in iterate_split(shards, "train")}
    for workers in (0, 1):
        for batch in create_dataloader(shards, "train", 4, num_workers=workers):
            want = torch.stack([decode_image(stored[k]) for k in batch["key"]])
            assert batch["image"].is_contiguous() and batch["image"].dtype == torch.float32
            assert torch.equal(batch["image"], want)
    no_pixels = next(iter(create_dataloader(shards, "train", 4, images=False)))
    assert no_pixels["image"].shape == (4, 0)


def test_to_tensor_batch_equals_to_tensor_of_each_image():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 9, 7, 3), dtype=torch.uint8, generator=gen).numpy()
    flipped = images[:, ::-1]  # not contiguous, as an augmentation may leave it
    for batch in (images, flipped):
        want = torch.stack([to_tensor(im) for im in batch])
        got = to_tensor_batch(torch.from_numpy(np.ascontiguousarray(batch)))
        assert torch.equal(got, want) and got.is_contiguous()


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK"])
def test_decode_rgb_is_pils_rgb_conversion(mode):
    buf = io.BytesIO()
    img = Image.new("RGB", (5, 4), (200, 30, 90)).convert(mode)
    img.save(buf, format="JPEG" if mode in ("RGB", "L", "CMYK") else "PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as ref:
        want = np.array(ref.convert("RGB"), dtype=np.uint8)
    got = decode_rgb(buf.getvalue())
    assert got.flags.writeable and got.dtype == np.uint8 and np.array_equal(got, want)


def test_a_shard_cut_anywhere_reads_as_in_webdataset(tmp_path):
    """Cut in a header, in data, in a metadata member, in the padding or the end blocks: the
    straight reader of plain headers ends, errs and names as tarfile's reader does."""
    full = Path(_tar(tmp_path / "full.tar", [
        ("k0.jpg", bytes(700)), ("__meta__", b"m" * 600), ("k0.txt", b"t"), ("k1.jpg", b"j"),
    ]))  # fmt: skip
    raw = full.read_bytes()
    for cut in [*range(0, len(raw), 61), len(raw) - 1024, len(raw)]:
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(raw[:cut])
        urls = [str(path), str(full)]  # what follows a cut shard, too
        for go_on in (True, False):
            assert _both(urls, go_on)[0] == _both(urls, go_on)[1], (cut, go_on)
        one = [{"url": str(path)}]
        assert _outcome(TarSamples()(iter(one))) == _outcome(wds.tarfile_samples(iter(one))), cut


class _Dribble(io.RawIOBase):
    """A raw stream that returns at most 37 bytes per read (a pipe, a socket)."""

    def __init__(self, raw: bytes) -> None:
        self.buf = io.BytesIO(raw)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self.buf.read(37 if n is None or n < 0 else min(n, 37))


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_short_reads_and_compressed_shards_read_whole(tmp_path, mode):
    path = tmp_path / "s.tar"
    with tarfile.open(path, mode) as tf:
        for i, size in enumerate([0, 1, 511, 512, 513, 3000]):
            info = tarfile.TarInfo(f"s{i}.bin")
            info.size = size
            tf.addfile(info, io.BytesIO(bytes([i]) * size))
    want = [(f"s{i}.bin", bytes([i]) * n) for i, n in enumerate([0, 1, 511, 512, 513, 3000])]
    assert list(TarSamples().members(_Dribble(path.read_bytes()))) == want
    assert list(TarSamples().members(io.BytesIO(path.read_bytes()))) == want
