"""mmpipe.shard: round trip, determinism across workers, rotation, clean re-runs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmpipe.align import run_align
from mmpipe.config import AlignParams, ShardParams, TransformSpec
from mmpipe.data import create_dataloader, iterate_split
from mmpipe.errors import InputError
from mmpipe.io import read_json, sha256_file
from mmpipe.manifest import read_manifest
from mmpipe.shard import preprocess_image, run_shard

SPLIT = AlignParams(train=0.5, val=0.25, test=0.25)


@pytest.fixture
def aligned(make_ingest, tmp_path) -> tuple[Path, Path]:
    ingest = make_ingest(n_images=24)
    run_align(ingest, SPLIT, tmp_path / "align")
    return tmp_path / "align", ingest


def shard(aligned, out: Path, **kw) -> dict:
    params = {"image_size": 16, "workers": 1, "copies": 2, "maxcount": 1000, **kw}
    return run_shard(aligned[0], aligned[1], ShardParams(**params), out)


def test_round_trip(aligned, tmp_path):
    out = tmp_path / "shards"
    report = shard(aligned, out)
    pairs = pd.read_parquet(aligned[0] / "pairs.parquet").set_index("pair_id")
    align_report = read_json(aligned[0] / "report.json")
    manifest = read_manifest(out)
    assert manifest.align_report_pairs_per_split == align_report["pairs_per_split"]
    assert manifest.classes == ["cat", "dog"] and manifest.image_size == 16
    for split in ("train", "val", "test"):
        samples = list(iterate_split(out, split))  # a row per caption of each sample
        copies = 3 if split == "train" else 1
        assert len(samples) == manifest.pairs(split)
        assert len(samples) == align_report["pairs_per_split"][split] * copies
        keys = [s["__key__"] for s in samples]
        assert len(set(keys)) == len(keys)
        images = pairs[pairs["split"] == split]["image_id"].nunique()
        assert manifest.count(split) == images * copies  # one sample per image (and copy)
        seen: dict[str, int] = {}
        for s in samples:
            pair = pairs.loc[s["json"]["pair_id"]]
            seen[pair.name] = seen.get(pair.name, 0) + 1
            suffix = f"_aug{s['json']['copy']}" if s["json"]["copy"] else ""
            assert s["__key__"] == pair.name + suffix
            assert s["sample_key"] == pair["image_id"] + suffix
            assert s["txt"] == pair["caption"] and s["json"]["split"] == split == pair["split"]
            assert s["json"]["label_index"] == pair["label_index"]
            assert s["json"]["source"] == "folder" and isinstance(s["json"]["meta"], dict)
            assert Image.open(io.BytesIO(s["jpg"])).size == (16, 16)
        assert set(seen) == set(pairs.index[pairs["split"] == split])
        assert set(seen.values()) == {copies}
        for entry in manifest.splits[split].shards:
            path = out / entry.name
            assert entry.sha256 == sha256_file(path) and entry.bytes == path.stat().st_size
    assert report["samples"] == sum(e.count for e in manifest.splits.values())
    assert report["images_per_second"] > 0
    assert manifest.labels == "partial"
    assert sum(manifest.labelled_pairs_per_split.values()) == align_report["labelled_pairs"]
    assert "seconds" not in (out / "manifest.json").read_text()


def test_identical_bytes_for_one_and_two_workers(aligned, tmp_path):
    shard(aligned, tmp_path / "w1", workers=1, maxcount=7)
    shard(aligned, tmp_path / "w2", workers=2, maxcount=7)
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_augmented_copies_differ_from_the_pair(aligned, tmp_path):
    aug = [TransformSpec(name="RandomBrightnessContrast", params={"p": 1.0})]
    shard(aligned, tmp_path / "s", train_augment=aug)
    samples = {s["__key__"]: s["jpg"] for s in iterate_split(tmp_path / "s", "train")}
    base = [k for k in samples if "_aug" not in k]
    assert all(samples[k] != samples[f"{k}_aug1"] != samples[f"{k}_aug2"] for k in base)


def test_maxcount_and_maxsize_rotation(aligned, tmp_path):
    shard(aligned, tmp_path / "a", maxcount=5)
    counts = [s.count for s in read_manifest(tmp_path / "a").splits["train"].shards]
    assert len(counts) > 2 and all(c == 5 for c in counts[:-1]) and 1 <= counts[-1] <= 5
    shard(aligned, tmp_path / "b", maxsize=12 * 1024)
    shards = read_manifest(tmp_path / "b").splits["train"].shards
    assert len(shards) > 2 and all(s.bytes <= 12 * 1024 for s in shards)


def test_loader_reads_what_shard_wrote(aligned, tmp_path):
    shard(aligned, tmp_path / "s")
    manifest = read_manifest(tmp_path / "s")
    batches = list(create_dataloader(tmp_path / "s", "train", 8, shuffle_buffer=10))
    assert sum(len(b["key"]) for b in batches) == manifest.pairs("train")  # every caption
    assert batches[0]["image"].shape[1:] == (3, 16, 16)
    one = list(create_dataloader(tmp_path / "s", "train", 8, shuffle_buffer=10, captions="one"))
    assert sum(len(b["key"]) for b in one) == manifest.count("train")  # a caption per image


@pytest.mark.parametrize("decode", ["reduced", "full"])
def test_stored_image_equals_preprocess_image(aligned, tmp_path, decode):
    """predict.py feeds preprocess_image output to the model: it must equal the stored bytes,
    for either shard.decode (the manifest records which)."""
    shard(aligned, tmp_path / "s", jpeg_quality=85, decode=decode)
    assert read_manifest(tmp_path / "s").decode == decode
    root = aligned[1].parent / "raw"  # the fixture's data root
    for s in iterate_split(tmp_path / "s", "val"):
        assert not Path(s["json"]["image_path"]).is_absolute()
        with Image.open(root / s["json"]["image_path"]) as img:
            assert preprocess_image(img, 16, 85, decode=decode) == s["jpg"]


def test_full_decode_resizes_from_full_resolution():
    """shard.decode: full never decodes at a reduced scale: the sample equals Pillow's full
    decode + the HAMMING resize, where `reduced` decodes a 640x480-class photo at 5/8."""
    from mmpipe.shard import sample_image, square_resize

    path = sorted(COCO_PHOTOS.glob("*.jpg"))[0]
    with Image.open(path) as img:
        full = sample_image(img, 256, "full")
    with Image.open(path) as img:
        img.load()
        expected = square_resize(img.convert("RGB"), 256)
    with Image.open(path) as img:
        reduced = sample_image(img, 256, "reduced")
    assert np.array_equal(np.asarray(full), np.asarray(expected))
    assert _psnr(full, reduced) < 45  # the two modes are different pictures


def test_preprocess_centre_crops_and_applies_exif():
    wide = Image.new("RGB", (30, 10), (255, 0, 0))
    wide.paste((0, 255, 0), (10, 0, 20, 10))  # centre third green
    out = Image.open(io.BytesIO(preprocess_image(wide, 8, 95)))
    r, g, b = out.getpixel((4, 4))
    assert g > 200 and r < 60 and out.size == (8, 8)
    tall = Image.new("RGB", (10, 20), (0, 0, 255))
    tall.paste((255, 255, 0), (0, 0, 10, 10))  # top half yellow
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise -> yellow on the right
    buf = io.BytesIO()
    tall.save(buf, format="JPEG", exif=exif)
    out = Image.open(io.BytesIO(preprocess_image(Image.open(io.BytesIO(buf.getvalue())), 10, 95)))
    left, right = out.getpixel((1, 1)), out.getpixel((8, 1))
    assert left[2] > 200 and left[0] < 60  # blue: without the transpose this would be yellow
    assert right[0] > 200 and right[2] < 60


def test_input_errors(aligned, tmp_path):
    with pytest.raises(InputError, match="pairs.parquet.*run `mmpipe align` first"):
        run_shard(tmp_path / "nope", aligned[1], ShardParams(), tmp_path / "s")
    bad = [TransformSpec(name="RandomResizedCrop", params={"height": 8, "width": 8})]
    with pytest.raises(InputError, match="RandomResizedCrop.*size=\\(h, w\\)"):
        shard(aligned, tmp_path / "s", train_augment=bad)
    rel = pd.read_parquet(aligned[0] / "pairs.parquet")["image_path"].iloc[0]
    (aligned[1].parent / "raw" / rel).unlink()
    with pytest.raises(InputError, match="image file not found"):
        shard(aligned, tmp_path / "s", workers=2)
    assert not (tmp_path / "s" / "manifest.json").exists()


COCO_PHOTOS = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco-mini" / "images"


def _jpeg(img: Image.Image, **save) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **save)
    return Image.open(io.BytesIO(buf.getvalue()))


def _psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(10 * np.log10(255**2 / max(np.mean((x - y) ** 2), 1e-9)))


def _full_scale(img: Image.Image, size: int) -> Image.Image:
    """The reference: full-resolution decode, centre square, LANCZOS."""
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return img.resize((size, size), Image.Resampling.LANCZOS, box=box)


def test_a_photo_is_decoded_at_the_smallest_eighth_that_keeps_image_size():
    """640x480-class photo for 256 px: libjpeg-turbo's 5/8 scale (Pillow's draft cannot reduce
    below 2x), never below image_size, and the sample stays the same picture."""
    from mmpipe.shard import _scaled_jpeg, sample_image

    path = sorted(COCO_PHOTOS.glob("*.jpg"))[0]
    with Image.open(path) as img:
        w, h = img.size
        decoded = _scaled_jpeg(img, 256)
    assert decoded is not None and min(decoded.size) >= 256
    assert decoded.size == (-(-w * 5 // 8), -(-h * 5 // 8))  # 422 px side: 5/8 -> 264 >= 256
    with Image.open(path) as img:
        sample = sample_image(img, 256)
    with Image.open(path) as img:
        reference = _full_scale(img, 256)
    assert sample.size == (256, 256) and sample.mode == "RGB"
    assert _psnr(sample, reference) > 28  # ~32 dB measured; a wrong crop or channel order < 15
    with Image.open(path) as img:  # 7/8 of the short side below image_size: no reduction
        assert _scaled_jpeg(img, min(w, h)) is None


def test_reduced_decode_keeps_greyscale_exif_and_refuses_what_it_cannot_decode():
    from mmpipe.shard import _scaled_jpeg, sample_image

    grey = Image.radial_gradient("L").resize((96, 64))
    out = sample_image(_jpeg(grey), 16)
    assert out.mode == "RGB" and _psnr(out, _full_scale(_jpeg(grey), 16)) > 28
    # EXIF orientation 6 on a reduced decode: the top half (yellow) shows on the right
    tall = Image.new("RGB", (64, 128), (0, 0, 255))
    tall.paste((255, 255, 0), (0, 0, 64, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    assert _scaled_jpeg(_jpeg(tall, exif=exif.tobytes()), 16) is not None
    out = sample_image(_jpeg(tall, exif=exif.tobytes()), 16)
    assert out.getpixel((2, 8))[2] > 200 and out.getpixel((13, 8))[0] > 200
    # CMYK is left to Pillow; a damaged stream is left to Pillow's verdict (and message)
    assert _scaled_jpeg(_jpeg(Image.new("CMYK", (96, 64))), 16) is None
    buf = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").save(buf, format="JPEG")
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]
    assert _scaled_jpeg(Image.open(io.BytesIO(cut)), 16) is None
    with pytest.raises(OSError, match="truncated"):
        sample_image(Image.open(io.BytesIO(cut)), 16)
