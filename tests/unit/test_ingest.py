"""mmpipe.ingest: every reject reason, the accounting invariant, readers and their errors."""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmpipe.config import IngestParams, SyntheticParams
from mmpipe.errors import InputError, ValidationFailed
from mmpipe.ingest import run_ingest
from mmpipe.io import read_json, read_jsonl

# --------------------------------------------------------------------------- tiny files


def _image_bytes(
    fmt: str = "JPEG",
    size: tuple[int, int] = (24, 16),
    seed: int = 0,
    noise: bool = False,
    exif: Image.Exif | None = None,
) -> bytes:
    """A small image; ``seed`` changes its colour so files differ unless asked to match."""
    if noise:
        import numpy as np

        arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        im = Image.fromarray(arr, "RGB")
    else:
        im = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, 120))
    buf = io.BytesIO()
    im.save(buf, fmt, **({"exif": exif} if exif is not None else {}))
    return buf.getvalue()


def _corrupt_png() -> bytes:
    data = bytearray(_image_bytes("PNG", (32, 32), noise=True))
    start = data.index(b"IDAT") + 40
    data[start : start + 64] = bytes(64)  # zeroed deflate stream: decoder errors, not truncation
    return bytes(data)


def _truncated_jpeg() -> bytes:
    data = _image_bytes("JPEG", (64, 64), noise=True)
    return data[: len(data) * 2 // 3]


def _write(root: Path, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def _csv(
    root: Path,
    rows: list[tuple[str, str]],
    name: str = "captions.csv",
    header: str = "image,caption",
) -> None:
    lines = [header.encode()] + [f'{img},"{cap}"'.encode() for img, cap in rows]
    (root / name).write_bytes(b"\n".join(lines) + b"\n")


def _ingest(root: Path, out: Path, **kw) -> dict:
    params = {"source": "folder", "root": str(root), "workers": 1, **kw}
    return run_ingest(IngestParams(**params), out)


def _rejects(out: Path) -> list[dict]:
    return read_jsonl(out / "rejects.jsonl")


@pytest.fixture
def root(tmp_path) -> Path:
    """A data root holding one good image and its caption."""
    r = tmp_path / "data"
    _write(r, "images/good.jpg", _image_bytes(seed=1))
    return r


# --------------------------------------------------------------------------- reasons

# reason -> (files to add, caption rows, extra params, kind)
IMAGE_CASES: dict[str, tuple[dict[str, Callable[[], bytes]], dict]] = {
    "zero_bytes": ({"images/empty.jpg": lambda: b""}, {}),
    "not_an_image": ({"images/text.jpg": lambda: b"hello, I am not a picture\n" * 4}, {}),
    # a PNG with its end marker whose data is bad: only decode mode decodes it (header leaves it
    # to shard, tests/unit/test_image_check.py)
    "corrupt": ({"images/broken.png": _corrupt_png}, {"image_check": "decode"}),
    "truncated": ({"images/cut.jpg": _truncated_jpeg}, {}),
    "unsupported_format": ({"images/anim.jpg": lambda: _image_bytes("GIF", seed=5)}, {}),
    "bad_extension": ({"images/scan.tif": lambda: _image_bytes("TIFF", seed=6)}, {}),
    "too_small": ({"images/tiny.jpg": lambda: _image_bytes(size=(4, 30), seed=7)}, {}),
    # 200x200 = 40k px: above max_pixels (header check) ...
    "too_many_pixels": (
        {"images/big.png": lambda: _image_bytes("PNG", (200, 200), seed=8)},
        {"max_pixels": 30_000},
    ),
    "duplicate": ({"images/zcopy.jpg": lambda: _image_bytes(seed=1)}, {}),
}


@pytest.mark.parametrize("reason", sorted(IMAGE_CASES))
def test_each_image_reason(root, tmp_path, reason):
    files, extra = IMAGE_CASES[reason]
    for rel, make in files.items():
        _write(root, rel, make())
    _csv(root, [("images/good.jpg", "a good picture")])
    report = _ingest(root, tmp_path / "out", **extra)
    rejects = _rejects(tmp_path / "out")
    assert [(r["kind"], r["reason"], r["file"]) for r in rejects] == [
        ("image", reason, next(iter(files)))
    ]
    assert report["images"] == {"seen": 2, "accepted": 1, "rejected": 1, "by_reason": {reason: 1}}
    assert report["captions"]["accepted"] == 1


def test_pixel_bomb_beyond_twice_the_limit_is_caught(root, tmp_path):
    # 40k px > 2 x 10k: Pillow raises DecompressionBombError in Image.open itself.
    _write(root, "images/bomb.png", _image_bytes("PNG", (200, 200), seed=9))
    _csv(root, [("images/good.jpg", "fine")])
    _ingest(root, tmp_path / "out", max_pixels=10_000, min_side=1)
    assert [r["reason"] for r in _rejects(tmp_path / "out")] == ["too_many_pixels"]


def test_image_symlink_escaping_root(root, tmp_path):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(_image_bytes(seed=3))
    (root / "images" / "link.jpg").symlink_to(outside)
    _csv(root, [("images/good.jpg", "fine")])
    _ingest(root, tmp_path / "out")
    [reject] = [r for r in _rejects(tmp_path / "out") if r["kind"] == "image"]
    assert (reject["reason"], reject["file"]) == ("path_escapes_root", "images/link.jpg")


CAPTION_CASES = {
    "empty_caption": (b'images/good.jpg," \t  "', {}),
    "invalid_utf8": (b'images/good.jpg,"caf\xe9 au lait"', {}),
    "caption_too_long": (b'images/good.jpg,"' + b"long " * 10 + b'"', {"max_caption_chars": 20}),
    "path_escapes_root": (b'../outside.jpg,"escaping"', {}),
    "bad_row": (b'images/good.jpg,"one",too,many', {}),
}


@pytest.mark.parametrize("reason", sorted(CAPTION_CASES))
def test_each_caption_reason(root, tmp_path, reason):
    bad_line, extra = CAPTION_CASES[reason]
    (root / "captions.csv").write_bytes(
        b"image,caption\n" + b'images/good.jpg,"fine"\n' + bad_line + b"\n"
    )
    report = _ingest(root, tmp_path / "out", **extra)
    assert [(r["kind"], r["reason"], r["file"], r["line"]) for r in _rejects(tmp_path / "out")] == [
        ("caption", reason, "captions.csv", 3)
    ]
    assert report["captions"] == {"seen": 2, "accepted": 1, "rejected": 1, "by_reason": {reason: 1}}


def test_jsonl_bad_rows_are_rejected_not_fatal(root, tmp_path):
    (root / "c.jsonl").write_bytes(
        b'{"image": "images/good.jpg", "caption": "ok"}\n'
        b'["not", "an", "object"]\n'
        b'{"image": "images/good.jpg", "caption": "bad \xff byte"}\n'
        b'{"image": "images/good.jpg", "caption": 42}\n'
        b'{"image": "images/good.jpg"}\n'
    )
    _ingest(root, tmp_path / "out", captions="c.jsonl")
    assert [(r["reason"], r["line"]) for r in _rejects(tmp_path / "out")] == [
        ("bad_row", 2),
        ("invalid_utf8", 3),
        ("bad_row", 4),
        ("bad_row", 5),
    ]


# --------------------------------------------------------------------------- invariants


GOOD, PNG_AS_JPG = "good", "png_named_jpg"
BAD = ("zero_bytes", "not_an_image", "truncated", "too_small")
MAKERS = {
    "zero_bytes": (".jpg", lambda i: b""),
    "not_an_image": (".jpg", lambda i: f"text {i}".encode()),
    "truncated": (".jpg", lambda i: _truncated_jpeg()),
    PNG_AS_JPG: (".jpg", lambda i: _image_bytes("PNG", seed=i)),
    "too_small": (".png", lambda i: _image_bytes("PNG", (3, 3), seed=i)),
    GOOD: (".jpg", lambda i: _image_bytes(seed=i + 100)),
}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from([GOOD, PNG_AS_JPG, *BAD]), min_size=1, max_size=8),
    missing=st.integers(0, 2),
    empty=st.integers(0, 2),
)
def test_seen_equals_accepted_plus_rejected(kinds, missing, empty):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        rows = []
        for i, kind in enumerate(kinds):
            ext, make = MAKERS[kind]
            rel = f"images/{i:03d}{ext}"
            _write(root, rel, make(i))
            rows.append((rel, f"caption {i}"))
        rows += [(f"images/missing{i}.jpg", "no such file") for i in range(missing)]
        rows += [("images/000.jpg" if kinds else "x.jpg", "  ") for _ in range(empty)]
        _csv(root, rows)
        report = _ingest(root, Path(tmp) / "out")
        for kind in ("images", "captions"):
            c = report[kind]
            assert (
                c["seen"]
                == c["accepted"] + c["rejected"]
                == c["accepted"] + sum(c["by_reason"].values())
            )
        # "truncated" files are all byte-identical, but they are rejected before dedupe
        good = kinds.count(GOOD) + kinds.count(PNG_AS_JPG)
        assert report["images"]["seen"] == len(kinds)
        assert report["images"]["accepted"] == good
        # every caption that will not reach a shard is a named reject
        assert report["captions"]["rejected"] == empty + missing + len(kinds) - good
        assert report["captions"]["by_reason"].get("missing_image", 0) == missing
        records = pd.read_parquet(Path(tmp) / "out" / "records.parquet")
        images = pd.read_parquet(Path(tmp) / "out" / "images.parquet")
        assert len(records) == good == len(images)
        assert records["image_id"].notna().all()
        assert set(images["format"]) <= {"JPEG", "PNG"}


# --------------------------------------------------------------------------- behaviour


def test_exif_orientation_transposes_size(root, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    _write(root, "images/rotated.jpg", _image_bytes(size=(40, 20), seed=2, exif=exif))
    _csv(root, [("images/rotated.jpg", "a rotated photo")])
    _ingest(root, tmp_path / "out")
    images = pd.read_parquet(tmp_path / "out" / "images.parquet").set_index("rel_path")
    assert tuple(images.loc["images/rotated.jpg", ["width", "height"]]) == (20, 40)
    assert tuple(images.loc["images/good.jpg", ["width", "height"]]) == (24, 16)


def test_duplicates_keep_the_first_in_record_order(root, tmp_path):
    data = (root / "images" / "good.jpg").read_bytes()
    _write(root, "images/zz_copy.jpg", data)
    _write(root, "a_first.jpg", data)  # first in path order, but no caption refers to it
    _csv(root, [("images/zz_copy.jpg", "caption of the copy"), ("images/good.jpg", "original")])
    _ingest(root, tmp_path / "out")
    images = pd.read_parquet(tmp_path / "out" / "images.parquet")
    records = pd.read_parquet(tmp_path / "out" / "records.parquet")
    assert list(images["rel_path"]) == ["images/zz_copy.jpg"]  # the first the captions name
    assert records["image_id"].tolist() == [images["image_id"][0]] * 2
    dups = _rejects(tmp_path / "out")
    assert sorted((d["file"], d["reason"], d["duplicate_of"]) for d in dups) == [
        ("a_first.jpg", "duplicate", "images/zz_copy.jpg"),
        ("images/good.jpg", "duplicate", "images/zz_copy.jpg"),
    ]


def test_records_and_images_tables(root, tmp_path):
    (root / "captions.csv").write_text(
        "image,caption,label,shape\n"
        'images/good.jpg,"  Cafe\u0301   on\tthe  left ",pos,circle\n'
        "images/missing.jpg,orphan caption,,square\n",
        encoding="utf-8",
    )
    _write(root, "images/sub/orphan.png", _image_bytes("PNG", seed=4))
    report = _ingest(root, tmp_path / "out")
    records = pd.read_parquet(tmp_path / "out" / "records.parquet")
    images = pd.read_parquet(tmp_path / "out" / "images.parquet")
    [first] = pq.read_table(tmp_path / "out" / "records.parquet").to_pylist()
    [missing] = _rejects(tmp_path / "out")
    assert (missing["reason"], missing["line"]) == ("missing_image", 3)
    assert first["caption"] == "Caf\u00e9 on the left"  # NFC + whitespace collapsed
    assert (first["label"], first["line"], first["source"]) == ("pos", 2, "folder")
    assert json.loads(first["meta"]) == {"shape": "circle"}
    assert len(first["caption_id"]) == 16
    assert sorted(images["rel_path"]) == ["images/good.jpg", "images/sub/orphan.png"]
    assert "path" not in images.columns  # paths are relative to the root: no absolute path
    row = images.set_index("rel_path").loc["images/good.jpg"]
    assert row["image_id"] == row["sha256"][:16] == first["image_id"]
    assert (row["format"], row["bytes"]) == ("JPEG", (root / "images/good.jpg").stat().st_size)
    assert report["images"]["seen"] == 2 and report["source"] == "folder"
    assert report["labelled_captions"] == 1
    on_disk = read_json(tmp_path / "out" / "report.json")
    assert on_disk == {
        k: v for k, v in report.items() if k not in ("seconds", "images_per_second", "image_checks")
    }
    assert not {"seconds", "validate_seconds", "images_per_second"} & set(on_disk)
    # stable ids: a second run gives the same tables
    _ingest(root, tmp_path / "again")
    pd.testing.assert_frame_equal(records, pd.read_parquet(tmp_path / "again" / "records.parquet"))


def test_parquet_captions_with_extra_columns(root, tmp_path):
    table = pa.table({"img": ["images/good.jpg"], "text": ["from parquet"], "score": [0.5]})
    pq.write_table(table, root / "c.parquet")
    _ingest(root, tmp_path / "out", captions="c.parquet", image_column="img", caption_column="text")
    rec = pd.read_parquet(tmp_path / "out" / "records.parquet").iloc[0]
    assert (rec["caption"], rec["line"], json.loads(rec["meta"])) == (
        "from parquet",
        1,
        {"score": 0.5},
    )


def test_pool_matches_single_process(tmp_path):
    root = tmp_path / "data"
    for i in range(40):
        _write(root, f"images/{i:02d}.jpg", _image_bytes(seed=i))
    _write(root, "images/zero.jpg", b"")
    _csv(root, [(f"images/{i:02d}.jpg", f"number {i}") for i in range(40)])
    one = _ingest(root, tmp_path / "one", workers=1)
    two = _ingest(root, tmp_path / "two", workers=2)
    for name in ("records.parquet", "images.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "one" / name), pd.read_parquet(tmp_path / "two" / name)
        )
    assert _rejects(tmp_path / "one") == _rejects(tmp_path / "two")
    assert one["images"] == two["images"]


# --------------------------------------------------------------------------- structural errors


def test_missing_column_names_file_and_found_columns(root, tmp_path):
    _csv(root, [("images/good.jpg", "x")], header="img,text")
    with pytest.raises(InputError, match=r"captions\.csv.*'image'.*\['img', 'text'\]"):
        _ingest(root, tmp_path / "out")


def test_malformed_jsonl_lines_are_rejects(root, tmp_path):
    """A trailing comma, single quotes or an unterminated string costs one record, not the file."""
    (root / "c.jsonl").write_text(
        '{"image": "images/good.jpg", "caption": "a"}\n'
        '{"image": "images/good.jpg", "caption": "trailing",}\n'
        "{'image': 'images/good.jpg', 'caption': 'single quotes'}\n"
        '{"image": "images/good.jpg", "caption": "unterminated}\n'
        '{"image": "images/good.jpg", "caption": "b"}\n'
    )
    report = _ingest(root, tmp_path / "out", captions="c.jsonl")
    rejects = _rejects(tmp_path / "out")
    assert [(r["reason"], r["file"], r["line"]) for r in rejects] == [
        ("bad_json", "c.jsonl", 2),
        ("bad_json", "c.jsonl", 3),
        ("bad_json", "c.jsonl", 4),
    ]
    assert report["captions"] == {
        "seen": 5,
        "accepted": 2,
        "rejected": 3,
        "by_reason": {"bad_json": 3},
    }
    with pytest.raises(ValidationFailed, match=r"c\.jsonl:2.*bad_json"):
        _ingest(root, tmp_path / "strict", captions="c.jsonl", strict=True)
    assert not (tmp_path / "strict" / "report.json").exists()


def test_captions_of_missing_or_rejected_images_are_rejects(root, tmp_path):
    _write(root, "images/empty.jpg", b"")
    _csv(
        root,
        [("images/good.jpg", "fine"), ("images/gone.jpg", "no file"), ("images/empty.jpg", "x")],
    )
    report = _ingest(root, tmp_path / "out")
    by_kind = {(r["kind"], r["reason"]): r for r in _rejects(tmp_path / "out")}
    assert by_kind[("caption", "missing_image")]["line"] == 3
    rejected = by_kind[("caption", "image_rejected")]
    assert rejected["line"] == 4 and "zero_bytes" in rejected["detail"]
    assert by_kind[("image", "zero_bytes")]["file"] == "images/empty.jpg"
    assert report["captions"]["accepted"] == 1 and report["captions"]["rejected"] == 2
    assert report["images"] == {
        "seen": 2,
        "accepted": 1,
        "rejected": 1,
        "by_reason": {"zero_bytes": 1},
    }


@pytest.mark.parametrize(
    "caption", ["nul \x00 byte", "escape \x1b[31m red", "c1 \x85 next line", "del \x7f"]
)
def test_control_characters_are_invalid_text(root, tmp_path, caption):
    (root / "c.jsonl").write_text(
        json.dumps({"image": "images/good.jpg", "caption": caption})
        + "\n"
        + json.dumps({"image": "images/good.jpg", "caption": "tab\there\nnewline"})
        + "\n"
    )
    _ingest(root, tmp_path / "out", captions="c.jsonl")
    assert [(r["reason"], r["line"]) for r in _rejects(tmp_path / "out")] == [("invalid_text", 1)]
    [kept] = pq.read_table(tmp_path / "out" / "records.parquet").to_pylist()
    assert kept["caption"] == "tab here newline"  # tab and newline are whitespace, collapsed


def test_png_named_jpg_is_accepted_with_its_real_format(root, tmp_path):
    _write(root, "images/really_png.jpg", _image_bytes("PNG", seed=5))
    _csv(root, [("images/really_png.jpg", "a png in disguise")])
    report = _ingest(root, tmp_path / "out")
    images = pd.read_parquet(tmp_path / "out" / "images.parquet").set_index("rel_path")
    assert images.loc["images/really_png.jpg", "format"] == "PNG"
    assert report["images"]["rejected"] == 0


def test_pixel_limit_message_states_the_configured_limit(root, tmp_path):
    _write(root, "images/big.png", _image_bytes("PNG", (200, 200), seed=8))
    _csv(root, [("images/good.jpg", "fine")])
    for limit in (30_000, 10_000):  # below and beyond Pillow's own 2x bomb threshold
        _ingest(root, tmp_path / f"out{limit}", max_pixels=limit, min_side=1)
        [reject] = _rejects(tmp_path / f"out{limit}")
        assert reject["reason"] == "too_many_pixels"
        assert reject["detail"] == f"200x200 = 40,000 pixels > ingest.max_pixels {limit:,}"


def _corruptions() -> dict[str, bytes]:
    """A large noisy JPEG (draft applies: 512 px -> 64 px) cut or damaged in several ways."""
    data = _image_bytes("JPEG", (512, 512), noise=True)
    sos = data.index(b"\xff\xda")
    mid = (sos + len(data)) // 2
    return {
        "cut_mid_scan": data[:mid],
        "cut_near_the_end": data[: len(data) - 40],
        "header_only": data[: sos + 20],
        "marker_in_scan": data[:mid] + b"\xff\xd9" + data[mid:],
    }


@pytest.mark.parametrize("case", sorted(_corruptions()))
def test_reduced_scale_check_catches_what_a_full_decode_catches(case):
    """The 1/8-scale JPEG check still decodes every entropy-coded byte: same verdict as full."""
    from mmpipe.ingest import check_image_bytes

    data = _corruptions()[case]
    full_error = None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as exc:  # noqa: BLE001
        full_error = exc
    reason, _, _ = check_image_bytes(data, {"JPEG", "MPO"}, 10**8, 8)
    assert (reason is not None) == (full_error is not None), (case, reason, full_error)
    assert full_error is not None or case == "marker_in_scan"


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"root": "/no/such/root"}, "data root not found.*/no/such/root"),
        ({"captions": "nope.csv"}, "captions file not found.*nope.csv"),
        ({"captions": "captions.txt"}, "captions.txt: unsupported captions file extension"),
    ],
)
def test_structural_errors(root, tmp_path, kw, pattern):
    (root / "captions.txt").write_text("x")
    params = {"root": str(root), **kw}
    with pytest.raises(InputError, match=pattern):
        run_ingest(IngestParams(source="folder", workers=1, **params), tmp_path / "out")


def test_strict_fails_on_first_reject(root, tmp_path):
    _write(root, "images/empty.jpg", b"")
    _csv(root, [("images/good.jpg", "fine")])
    with pytest.raises(ValidationFailed, match=r"images/empty\.jpg.*zero_bytes"):
        _ingest(root, tmp_path / "out", strict=True)
    (root / "captions.csv").write_text(
        'image,caption\nimages/good.jpg,"fine"\nimages/good.jpg," "\n'
    )
    with pytest.raises(ValidationFailed, match=r"captions\.csv:3.*empty_caption"):
        _ingest(root, tmp_path / "out", strict=True)
    assert not (tmp_path / "out" / "records.parquet").exists()


def test_strict_passes_clean_data(root, tmp_path):
    _csv(root, [("images/good.jpg", "fine")])
    assert _ingest(root, tmp_path / "out", strict=True)["captions"]["accepted"] == 1


# --------------------------------------------------------------------------- coco + synthetic


def _coco(root: Path) -> None:
    _write(root, "imgs/1.jpg", _image_bytes(seed=11))
    _write(root, "imgs/2.jpg", _image_bytes(seed=12))
    doc = {
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "one"},
            {"id": 11, "image_id": 2, "caption": "two"},
            {"id": 12, "image_id": 99, "caption": "unknown image"},
            {"id": 13, "caption": "no image id"},
        ],
    }
    (root / "caps.json").write_text(json.dumps(doc))
    (root / "labels.csv").write_text("file_name,label\n1.jpg,cat\n")


def test_coco_source(tmp_path):
    root = tmp_path / "coco"
    _coco(root)
    report = run_ingest(
        IngestParams(
            source="coco",
            root=str(root),
            captions="caps.json",
            images_dir="imgs",
            labels_file="labels.csv",
            workers=1,
        ),
        tmp_path / "out",
    )
    rec = {r["line"]: r for r in pq.read_table(tmp_path / "out" / "records.parquet").to_pylist()}
    assert list(rec) == [1, 2]
    assert rec[1]["label"] == "cat" and rec[2]["label"] is None
    assert rec[1]["image_ref"] == "imgs/1.jpg" and rec[1]["image_id"] is not None
    assert json.loads(rec[1]["meta"]) == {"coco_annotation_id": 10, "coco_image_id": 1}
    assert report["captions"]["by_reason"] == {"bad_row": 1, "unknown_image_id": 1}
    unknown = [r for r in _rejects(tmp_path / "out") if r["reason"] == "unknown_image_id"]
    assert [(u["file"], u["line"]) for u in unknown] == [("caps.json", 3)]
    assert "annotation 12" in unknown[0]["detail"]
    assert report["images"]["accepted"] == 2 and report["source"] == "coco"


def test_coco_paths_leaving_images_dir_and_missing_dir(tmp_path):
    root = tmp_path / "coco"
    _coco(root)
    doc = json.loads((root / "caps.json").read_text())
    doc["images"] += [
        {"id": 3, "file_name": "/etc/hostname"},
        {"id": 4, "file_name": "../caps.json"},
    ]
    doc["annotations"] = doc["annotations"][:2] + [
        {"id": 20, "image_id": 3, "caption": "absolute"},
        {"id": 21, "image_id": 4, "caption": "dot dot"},
    ]
    (root / "caps.json").write_text(json.dumps(doc))
    params = dict(source="coco", root=str(root), captions="caps.json", images_dir="imgs", workers=1)
    report = run_ingest(IngestParams(**params), tmp_path / "out")
    assert [(r["reason"], r["line"]) for r in _rejects(tmp_path / "out")] == [
        ("path_escapes_root", 3),
        ("path_escapes_root", 4),
    ]
    assert report["captions"]["accepted"] == 2
    params["images_dir"] = "no_such_dir"
    with pytest.raises(InputError, match="COCO images directory not found.*no_such_dir"):
        run_ingest(IngestParams(**params), tmp_path / "out2")


def test_coco_invalid_json_names_line(tmp_path):
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    (root / "caps.json").write_text('{"images": [],\n "annotations": [\n oops]}')
    with pytest.raises(InputError, match=r"caps\.json:3: not valid JSON"):
        run_ingest(
            IngestParams(source="coco", root=str(root), captions="caps.json"), tmp_path / "o"
        )


def test_synthetic_source_reads_through_folder_path(tmp_path):
    p = IngestParams(
        workers=1, synthetic=SyntheticParams(n_images=10, captions_per_image=2, image_size=24)
    )
    report = run_ingest(p, tmp_path)
    assert (tmp_path / "source" / ".complete").is_file()
    assert report["source"] == "synthetic"
    assert report["images"] == {"seen": 10, "accepted": 10, "rejected": 0, "by_reason": {}}
    assert report["captions"]["accepted"] == 20
    rec = pd.read_parquet(tmp_path / "records.parquet")
    assert set(rec["source"]) == {"synthetic"} and rec["image_id"].notna().all()
    assert set(json.loads(rec["meta"][0])) == {"main_shape", "mood", "sentiment"}
    assert set(rec["label"]) <= {"consistent", "inconsistent"}
    assert report["synthetic"]["n_images"] == 10
    assert report["data_root"] == "source"  # relative to the ingest dir: survives a rename
    assert "seconds" not in (tmp_path / "report.json").read_text()


def test_docs_list_every_reject_reason():
    from mmpipe.ingest import REJECT_REASONS
    from tests.conftest import REPO

    page = (REPO / "docs" / "reject-reasons.md").read_text()
    for code, meaning in REJECT_REASONS.items():
        assert f"| `{code}` | {meaning} |" in page, code


def test_absolute_image_path_inside_the_root_is_stored_relative(root, tmp_path):
    _csv(root, [(str(root / "images" / "good.jpg"), "absolute but inside")])
    report = _ingest(root, tmp_path / "out")
    images = pd.read_parquet(tmp_path / "out" / "images.parquet")
    assert report["captions"]["accepted"] == 1
    assert list(images["rel_path"]) == ["images/good.jpg"]


# --------------------------------------------------------------------------- tasks' columns


def _jsonl(root: Path, rows: list[dict], name: str = "c.jsonl") -> None:
    (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_text_columns_are_joined_into_the_text_input(root, tmp_path):
    """SNLI-VE-style premise + hypothesis: one text, by a template or the default separator; a
    record missing one of them is rejected, naming the column."""
    rows = [
        {"image": "images/good.jpg", "premise": "A dog runs.", "hypothesis": "An animal moves."},
        {"image": "images/good.jpg", "premise": "A cat sits.", "hypothesis": "  "},
        {"image": "images/good.jpg", "premise": "Rain.", "hypothesis": "Wet.", "label": "neutral"},
    ]
    _jsonl(root, rows)
    cols = {"captions": "c.jsonl", "text_columns": ["premise", "hypothesis"]}
    report = _ingest(root, tmp_path / "a", **cols, text_template="P: {premise} H: {hypothesis}")
    assert report["captions"]["by_reason"] == {"empty_caption": 1}
    assert "'hypothesis'" in _rejects(tmp_path / "a")[0]["detail"]
    rec = pd.read_parquet(tmp_path / "a" / "records.parquet")
    assert list(rec["caption"]) == ["P: A dog runs. H: An animal moves.", "P: Rain. H: Wet."]
    assert rec["label"].isna().tolist() == [True, False] and rec["label"][1] == "neutral"
    assert json.loads(rec["meta"][0]) == {}  # the text columns are the text, not meta
    _ingest(root, tmp_path / "b", **cols)
    rec = pd.read_parquet(tmp_path / "b" / "records.parquet")
    assert rec["caption"][0] == "A dog runs. [SEP] An animal moves."
    with pytest.raises(InputError, match=r"required column\(s\) \['hypothesis'\] missing"):
        _csv(root, [("images/good.jpg", "x")], header="image,premise")
        _ingest(root, tmp_path / "c", text_columns=["premise", "hypothesis"])


def test_vqa_answers_are_normalised_and_questions_are_the_text(root, tmp_path):
    rows = [
        {"image": "images/good.jpg", "q": "How many dogs?", "a": "Two"},
        {"image": "images/good.jpg", "q": "What is it?", "a": "A Dog."},
    ]
    _jsonl(root, rows)
    _ingest(root, tmp_path / "a", captions="c.jsonl", question_column="q", answer_column="a")
    rec = pd.read_parquet(tmp_path / "a" / "records.parquet")
    assert list(rec["caption"]) == ["How many dogs?", "What is it?"]
    assert list(rec["label"]) == ["2", "dog"]  # the VQA evaluation's normalisation


def test_label_separator_canonicalises_multi_labels(root, tmp_path):
    rows = [{"image": "images/good.jpg", "caption": "c", "label": lab}
            for lab in ("dog| cat|dog", "|", "bird")]  # fmt: skip
    _jsonl(root, rows)
    _ingest(root, tmp_path / "a", captions="c.jsonl", label_separator="|")
    table = pq.read_table(tmp_path / "a" / "records.parquet")
    assert table["label"].to_pylist() == ["cat|dog", None, "bird"]
    assert table.schema.metadata[b"mmpipe.label_separator"] == b"|"  # align splits on it


def test_synthetic_tasks_keep_the_images_and_change_the_labels(tmp_path):
    """label=... and question mode draw the same scenes: identical image files."""
    base = {"n_images": 8, "captions_per_image": 2, "image_size": 24}
    reports = {}
    for name, extra in {"default": {}, "tags": {"label": "tags"}, "qa": {"questions": True},
                        "score": {"label": "score"}}.items():  # fmt: skip
        p = IngestParams(workers=1, synthetic=SyntheticParams(**base, **extra))
        reports[name] = run_ingest(p, tmp_path / name)
    images = {n: pd.read_parquet(tmp_path / n / "images.parquet")["sha256"].tolist()
              for n in reports}  # fmt: skip
    assert images["default"] == images["tags"] == images["qa"] == images["score"]
    tags = pd.read_parquet(tmp_path / "tags" / "records.parquet")["label"]
    assert all(t.count("|") >= 1 for t in tags)  # shapes + the caption's sentiment
    qa = pd.read_parquet(tmp_path / "qa" / "records.parquet")
    assert qa["caption"].str.endswith("?").all()
    assert set(json.loads(qa["meta"][0])) == {"question_type", "main_shape", "mood"}
    assert not ({"zero", "one", "two", "three"} & set(qa["label"]))  # normalised to digits
    scores = pd.read_parquet(tmp_path / "score" / "records.parquet")["label"].astype(float)
    assert scores.between(1.0, 5.0).all() and scores.nunique() > 4
