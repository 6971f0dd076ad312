"""shard's tar writer: the same bytes as tarfile's stream writer (and so as webdataset's
TarWriter with mmpipe's owner/mode/mtime), on every name shape the fast header path takes or
hands back to tarfile."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from mmpipe.shard import MTIME, TarWriter, tar_header


def _tarfile_bytes(samples: list[dict]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|") as tar:
        for sample in samples:
            for ext in sorted(k for k in sample if not k.startswith("_")):
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(sample[ext]), MTIME, 0o444
                info.uname = info.gname = "mmpipe"
                tar.addfile(info, io.BytesIO(sample[ext]))
    return buf.getvalue()


def _ours(samples: list[dict]) -> bytes:
    buf = io.BytesIO()
    writer = TarWriter(buf)
    for sample in samples:
        writer.write(sample)
    writer.close()
    return buf.getvalue()


KEYS = [
    "train-000001",  # shard's keys
    "a",
    "k" * 95,  # name of exactly 100 bytes with ".jpg"
    "k" * 97,  # 101 bytes: tarfile's pax header for the long name
    "café",  # non-ASCII: pax header
    "dir/sub/key",
]
SIZES = [0, 1, 511, 512, 513, 20_000]


@pytest.mark.parametrize("key", KEYS)
def test_same_bytes_as_tarfile(key: str) -> None:
    samples = [
        {"__key__": f"{key}{i}", "jpg": b"\xff" * n, "json": b'{"a": 1}', "txt": b"cap"}
        for i, n in enumerate(SIZES)
    ]
    assert _ours(samples) == _tarfile_bytes(samples)


def test_empty_archive_and_header_fields() -> None:
    assert _ours([]) == _tarfile_bytes([])
    header = tar_header("x.jpg", 1234)
    info = tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
    assert (info.name, info.size, info.mode, info.mtime) == ("x.jpg", 1234, 0o444, MTIME)
    assert (info.uname, info.gname) == ("mmpipe", "mmpipe")


def test_webdataset_reads_it_back(tmp_path) -> None:
    samples = [
        {"__key__": f"s{i:03d}", "jpg": bytes([i]) * (i * 97), "txt": b"t"} for i in range(7)
    ]
    (tmp_path / "a.tar").write_bytes(_ours(samples))
    got = list(wds.tarfile_samples(iter([{"url": str(tmp_path / "a.tar")}])))
    assert [(g["__key__"], g["jpg"], g["txt"]) for g in got] == [
        (s["__key__"], s["jpg"], s["txt"]) for s in samples
    ]
