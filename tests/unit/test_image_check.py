"""ingest.image_check: `header` (the default) leaves the one full decode to shard, which rejects
what it cannot decode as named, counted pairs (or to curate, when its hashing or scorer decodes
first: a named, counted image reject); `decode` keeps every corrupt image an ingest reject."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmpipe.align import run_align
from mmpipe.config import AlignParams, CurateParams, IngestParams, Params, ShardParams, load_params
from mmpipe.curate import run_curate
from mmpipe.errors import InputError, ValidationFailed
from mmpipe.ingest import check_image_bytes, run_ingest
from mmpipe.io import read_json, read_jsonl
from mmpipe.layout import Layout
from mmpipe.shard import run_shard

JPEG = {"JPEG", "MPO"}


def _photo(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "JPEG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, fmt)
    return buf.getvalue()


def _bad_huffman(seed: int) -> bytes:
    """A whole JPEG (headers and end marker intact) whose Huffman table is bogus: only a decode
    tells (libjpeg: "broken data stream")."""
    data = bytearray(_photo(seed))
    dht = data.index(b"\xff\xc4")
    data[dht + 5 : dht + 21] = b"\xff" * 16  # the table's code counts
    return bytes(data)


def _bad_png(seed: int) -> bytes:
    """A PNG with its IEND, whose deflate stream is zeroed: only a decode tells."""
    data = bytearray(_photo(seed, fmt="PNG"))
    start = data.index(b"IDAT") + 40
    data[start : start + 64] = bytes(64)
    return bytes(data)


def _cuts() -> dict[str, bytes]:
    data = _photo(0, (512, 512))
    sos = data.index(b"\xff\xda")
    return {
        "cut_mid_scan": data[: (sos + len(data)) // 2],
        "cut_near_the_end": data[: len(data) - 40],
        "header_only": data[: sos + 20],
    }


@pytest.mark.parametrize("case", sorted(_cuts()))
def test_header_check_still_rejects_a_cut_jpeg(case):
    """A JPEG without its end marker is decoded in full even in header mode: same verdict."""
    data = _cuts()[case]
    decoded = check_image_bytes(data, JPEG, 10**8, 8, decode=True)
    header = check_image_bytes(data, JPEG, 10**8, 8, decode=False)
    assert decoded[0] in ("truncated", "corrupt")
    assert header == decoded


def test_header_check_does_not_decode_the_pixels():
    bad = _bad_huffman(1)
    assert check_image_bytes(bad, JPEG, 10**8, 8, decode=True)[0] == "corrupt"
    assert check_image_bytes(bad, JPEG, 10**8, 8, decode=False) == (
        None,
        "",
        {"width": 48, "height": 40, "format": "JPEG"},
    )
    # the header checks themselves still apply
    assert check_image_bytes(_photo(2), JPEG, 100, 8, decode=False)[0] == "too_many_pixels"
    assert check_image_bytes(_photo(2), JPEG, 10**8, 41, decode=False)[0] == "too_small"


FILES = {
    **{f"images/good{k}.jpg": (lambda k=k: _photo(10 + k)) for k in range(8)},
    "images/cut.jpg": lambda: _photo(30)[:-300],  # a truncated download
    "images/text.jpg": lambda: b"not a picture at all\n" * 8,  # a non-image named .jpg
    "images/huffman.jpg": lambda: _bad_huffman(31),  # undecodable, structure intact
    "images/zeroed.png": lambda: _bad_png(32),
}
ROWS = [(rel, f"caption {i} of {rel}") for i, rel in enumerate(FILES)] + [
    ("images/huffman.jpg", "a second caption of the bogus-table jpeg"),
    ("images/good0.jpg", "a second caption of good0"),
]


def write_collection(root: Path) -> Path:
    """FILES under ``root`` and captions.csv with ROWS (once)."""
    if not root.exists():
        for rel, make in FILES.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(make())
        lines = ["image,caption", *(f"{rel},{cap}" for rel, cap in ROWS)]
        (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return root


def _ingest(tmp_path: Path, image_check: str, workers: int = 1) -> Layout:
    root = write_collection(tmp_path / "data")
    layout = Layout(tmp_path / f"{image_check}-{workers}")
    p = IngestParams(source="folder", root=str(root), workers=workers, image_check=image_check)
    run_ingest(p, layout.ingest_dir)
    return layout


def _curate(layout: Layout, tmp_path: Path, curate: CurateParams | None = None) -> dict:
    p = curate or CurateParams(workers=1)
    return run_curate(layout.ingest_dir, p, layout.curate_dir, data_root=tmp_path / "data")


def _run(
    tmp_path: Path, image_check: str, workers: int = 1, curate: CurateParams | None = None
) -> Layout:
    """ingest -> curate -> align -> shard on FILES, as the pipeline chains them."""
    layout = _ingest(tmp_path, image_check, workers)
    _curate(layout, tmp_path, curate)
    run_align(layout.curate_dir, AlignParams(train=0.5, val=0.25, test=0.25), layout.align_dir)
    shard_p = ShardParams(image_size=16, copies=1, workers=workers, maxcount=3)
    run_shard(layout.align_dir, layout.ingest_dir, shard_p, layout.shard_dir)
    return layout


def test_header_is_the_default():
    assert IngestParams().image_check == "header" == Params().ingest.image_check
    assert load_params(Path(__file__).parents[2] / "params.yaml").ingest.image_check == "header"


def test_header_mode_rejects_each_bad_image_once_and_the_counts_add_up(tmp_path):
    layout = _run(tmp_path, "header")
    ingest = read_json(layout.ingest_dir / "report.json")
    assert ingest["image_check"] == "header"
    assert ingest["images"]["seen"] == ingest["images"]["accepted"] + ingest["images"]["rejected"]
    # ingest still rejects what it can see without decoding: the cut file, the non-image
    ingest_rejects = {
        r["file"]: r["reason"]
        for r in read_jsonl(layout.ingest_dir / "rejects.jsonl")
        if r["kind"] == "image"
    }
    assert ingest_rejects == {"images/cut.jpg": "truncated", "images/text.jpg": "not_an_image"}
    # shard's decode finds the other two: every pair of them is a named reject
    rejects = read_jsonl(layout.shard_dir / "rejects.jsonl")
    assert sorted(r["file"] for r in rejects) == [
        "images/huffman.jpg",
        "images/huffman.jpg",
        "images/zeroed.png",
    ]
    assert {r["reason"] for r in rejects} == {"undecodable_image"}
    assert all(r["kind"] == "pair" and r["pair_id"] and r["image_id"] for r in rejects)
    assert "broken data stream" in next(r for r in rejects if "huffman" in r["file"])["detail"]
    manifest = read_json(layout.shard_dir / "manifest.json")
    pairs_in = manifest["align_report_pairs_per_split"]
    rejected = manifest["rejected_pairs_per_split"]
    for split, entry in manifest["splits"].items():
        copies = 2 if split == "train" else 1
        # pairs in = pairs sharded + pairs rejected (each sharded pair in every copy)
        assert entry["pairs"] == (pairs_in[split] - rejected[split]) * copies
    assert sum(rejected.values()) == len(rejects) == 3
    assert sum(pairs_in.values()) == 8 + 1 + 3  # good0 has two captions, huffman two, png one


def test_header_mode_shards_are_identical_for_one_and_two_workers(tmp_path):
    one = _run(tmp_path, "header", workers=1).shard_dir
    two = _run(tmp_path, "header", workers=2).shard_dir
    names = sorted(p.name for p in one.iterdir())
    assert "rejects.jsonl" in names and names == sorted(p.name for p in two.iterdir())
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_decode_mode_rejects_all_four_in_ingest(tmp_path):
    layout = _run(tmp_path, "decode")
    reasons = {
        r["file"]: r["reason"]
        for r in read_jsonl(layout.ingest_dir / "rejects.jsonl")
        if r["kind"] == "image"
    }
    assert reasons == {
        "images/cut.jpg": "truncated",
        "images/text.jpg": "not_an_image",
        "images/huffman.jpg": "corrupt",
        "images/zeroed.png": "corrupt",
    }
    manifest = read_json(layout.shard_dir / "manifest.json")
    assert "rejected_pairs_per_split" not in manifest
    assert not (layout.shard_dir / "rejects.jsonl").exists()


def test_decode_mode_shard_fails_on_an_image_damaged_after_ingest(tmp_path):
    layout = _run(tmp_path, "decode")
    (tmp_path / "data" / "images" / "good3.jpg").write_bytes(_bad_huffman(3))
    with pytest.raises(InputError, match="good3.jpg: unreadable image.*re-run `mmpipe ingest`"):
        run_shard(layout.align_dir, layout.ingest_dir, ShardParams(image_size=16), tmp_path / "s")


def test_model_card_data_counts_shard_rejects(tmp_path):
    from mmpipe.modelcard import training_data

    data = training_data(_run(tmp_path, "header"))
    assert data["rejected"] == {"images": 2, "captions": 2, "shard pairs": 3}


def _strict_ingest(tmp_path: Path) -> Layout:
    """Strict header-mode ingest of 4 good photos and huffman.jpg, which the header check
    passes (structure intact)."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for k in range(4):
        (root / f"images/good{k}.jpg").write_bytes(_photo(40 + k))
    (root / "images/huffman.jpg").write_bytes(_bad_huffman(44))
    names = sorted(p.name for p in (root / "images").iterdir())
    (root / "captions.csv").write_text(
        "image,caption\n" + "".join(f"images/{n},a caption of {n}\n" for n in names)
    )
    layout = Layout(tmp_path / "strict")
    p = IngestParams(source="folder", root=str(root), image_check="header", strict=True)
    run_ingest(p, layout.ingest_dir)
    return layout


def test_strict_header_mode_fails_shard_at_the_first_undecodable_image(tmp_path):
    """ingest.strict keeps fail-fast when shard's decode is the check: no shards, the image named."""
    layout = _strict_ingest(tmp_path)
    run_align(layout.ingest_dir, AlignParams(train=0.5, val=0.25, test=0.25), layout.align_dir)
    with pytest.raises(ValidationFailed, match=r"images/huffman\.jpg: undecodable_image"):
        run_shard(layout.align_dir, layout.ingest_dir, ShardParams(image_size=16), layout.shard_dir)


# ----------------------------------------------------------------------------- curate decodes first


def _curate_rejects(layout: Layout) -> tuple[dict, list[dict]]:
    report = read_json(layout.curate_dir / "report.json")
    return report, read_jsonl(layout.curate_dir / "rejects.jsonl")


def check_curate_counts(report: dict, rejects: list[dict]) -> None:
    for kind, key in (("pair", "pairs"), ("image", "images")):
        c = report[key]
        assert c["in"] == c["kept"] + c["rejected"] == c["kept"] + sum(c["by_reason"].values())
        assert c["rejected"] == sum(r["kind"] == kind for r in rejects)


def test_curate_hashing_rejects_an_undecodable_image_by_name_and_shard_gets_none(tmp_path):
    """Default ingest (header) + curate.near_duplicates: curate's hash is the first decode; the
    two images ingest's header check passed but nothing can decode leave there, named."""
    layout = _run(tmp_path, "header", curate=CurateParams(workers=2, near_duplicates=True))
    report, rejects = _curate_rejects(layout)
    images = {r["file"]: r for r in rejects if r["kind"] == "image"}
    assert sorted(images) == ["images/huffman.jpg", "images/zeroed.png"]
    assert {r["reason"] for r in images.values()} == {"undecodable_image"}
    assert "broken data stream" in images["images/huffman.jpg"]["detail"]
    pairs = [r for r in rejects if r["kind"] == "pair"]
    by_image = {r["image_id"]: r["file"] for r in images.values()}
    assert sorted(by_image[r["image_id"]] for r in pairs) == [
        "images/huffman.jpg",
        "images/huffman.jpg",
        "images/zeroed.png",
    ]
    assert {(r["reason"], r["detail"]) for r in pairs} == {("image_rejected", "undecodable_image")}
    assert report["images"]["by_reason"] == {"undecodable_image": 2}
    assert report["near_duplicates"]["unhashable_images"] == 2
    check_curate_counts(report, rejects)
    # shard decodes only what curate kept: nothing left to reject, every kept pair sharded
    manifest = read_json(layout.shard_dir / "manifest.json")
    assert sum(manifest["rejected_pairs_per_split"].values()) == 0
    assert sum(manifest["align_report_pairs_per_split"].values()) == report["pairs"]["kept"] == 9
    assert read_jsonl(layout.shard_dir / "rejects.jsonl") == []


def test_curate_off_leaves_the_undecodable_images_to_shard(tmp_path):
    layout = _run(tmp_path, "header")
    report, rejects = _curate_rejects(layout)
    assert rejects == [] and report["pairs"]["rejected"] == 0
    assert {r["file"] for r in read_jsonl(layout.shard_dir / "rejects.jsonl")} == {
        "images/huffman.jpg",
        "images/zeroed.png",
    }


def test_curate_strict_header_mode_fails_at_the_first_undecodable_image(tmp_path):
    layout = _strict_ingest(tmp_path)
    with pytest.raises(ValidationFailed, match=r"images/huffman\.jpg: undecodable_image"):
        _curate(layout, tmp_path, CurateParams(workers=1, near_duplicates=True))
    assert not (layout.curate_dir / "report.json").exists()


def test_curate_decode_mode_fails_on_an_image_damaged_after_ingest(tmp_path):
    layout = _ingest(tmp_path, "decode")
    (tmp_path / "data" / "images" / "good3.jpg").write_bytes(_bad_huffman(3))
    with pytest.raises(InputError, match="good3.jpg: unreadable image.*re-run `mmpipe ingest`"):
        _curate(layout, tmp_path, CurateParams(workers=1, near_duplicates=True))


def test_curate_fails_on_an_image_file_gone_since_ingest(tmp_path):
    layout = _ingest(tmp_path, "header")
    (tmp_path / "data" / "images" / "good5.jpg").unlink()
    with pytest.raises(InputError, match="good5.jpg: image file not found"):
        _curate(layout, tmp_path, CurateParams(workers=1, near_duplicates=True))
