"""mmpipe.data: batches, shuffling, rank splitting, workers, resume, skip counting."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from mmpipe.config import TransformSpec
from mmpipe.data import create_dataloader, decode_image, iterate_split
from mmpipe.errors import InputError
from mmpipe.io import sha256_file
from mmpipe.manifest import read_manifest

COUNTS = {"train": [7, 5, 9], "val": [4]}  # uneven shards on purpose


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_batch_shapes_and_dtypes(make_shards):
    shards = make_shards(COUNTS, size=8)
    batches = list(create_dataloader(shards, "train", 4))
    assert [len(b["key"]) for b in batches] == [4, 4, 4, 4, 4, 1]
    b = batches[0]
    assert b["image"].shape == (4, 3, 8, 8) and b["image"].dtype == torch.float32
    assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
    assert b["label"].dtype == torch.long and b["label"].tolist() == [0, 1, 0, 1]
    assert b["text"][:2] == ["caption 0", "caption 1"]
    assert b["image_id"][:3] == ["trainimg0", "trainimg0", "trainimg1"]
    assert b["caption_id"][0] == "train00000" and b["meta"][1] == {"n": 1}
    # unshuffled order is the manifest's, so evaluation is deterministic
    assert keys_of(create_dataloader(shards, "train", 4)) == [f"train{n:05d}" for n in range(21)]


def test_drop_last_and_limit(make_shards):
    shards = make_shards(COUNTS)
    assert [len(b["key"]) for b in create_dataloader(shards, "train", 4, drop_last=True)] == [4] * 5
    assert keys_of(create_dataloader(shards, "train", 4, limit=6)) == [
        f"train{n:05d}" for n in range(6)
    ]


def test_decode_image_normalises_to_minus_one_one():
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (255, 0, 255)).save(buf, format="PNG")
    x = decode_image(buf.getvalue())
    assert x.shape == (3, 2, 2)
    assert x[0].eq(1.0).all() and x[1].eq(-1.0).all() and x[2].eq(1.0).all()


def test_shuffle_sees_every_sample_once_and_varies_by_epoch(make_shards):
    shards = make_shards(COUNTS)
    e0 = keys_of(create_dataloader(shards, "train", 4, shuffle_buffer=5, seed=1, epoch=0))
    e0_again = keys_of(create_dataloader(shards, "train", 4, shuffle_buffer=5, seed=1, epoch=0))
    e1 = keys_of(create_dataloader(shards, "train", 4, shuffle_buffer=5, seed=1, epoch=1))
    everything = sorted(f"train{n:05d}" for n in range(21))
    assert sorted(e0) == everything and sorted(e1) == everything
    assert e0 == e0_again  # seeded
    assert e0 != e1 and e0 != everything


@pytest.mark.parametrize("shuffle_buffer", [0, 6])
def test_ranks_are_disjoint_equal_and_cover_the_split(make_shards, shuffle_buffer):
    shards = make_shards(COUNTS)
    per_rank = []
    for rank in range(2):
        kw = dict(shuffle_buffer=shuffle_buffer, epoch=2, rank=rank, world_size=2)
        batches = list(create_dataloader(shards, "train", 3, drop_last=True, **kw))
        assert len(batches) == 3  # 21 // 2 = 10 samples -> 3 full batches on both ranks
        per_rank.append(set(keys_of(create_dataloader(shards, "train", 3, **kw))))
    assert len(per_rank[0]) == len(per_rank[1]) == 10
    assert not per_rank[0] & per_rank[1]
    assert len(per_rank[0] | per_rank[1]) == 20  # one tail sample dropped for equal counts


def test_num_workers_two(make_shards):
    shards = make_shards(COUNTS)
    loader = create_dataloader(shards, "train", 4, num_workers=2, shuffle_buffer=4, seed=3)
    keys = keys_of(loader)
    assert sorted(keys) == sorted(f"train{n:05d}" for n in range(21))
    assert loader.stats["samples"] == 21 and loader.stats["skipped"] == 0
    again = keys_of(create_dataloader(shards, "train", 4, num_workers=2, shuffle_buffer=4, seed=3))
    assert keys == again  # deterministic for a fixed worker count


def test_skip_batches_resumes_exactly(make_shards):
    shards = make_shards(COUNTS)
    kw = {"shuffle_buffer": 5, "seed": 4, "epoch": 1, "num_workers": 2}
    full = list(create_dataloader(shards, "train", 4, **kw))
    resumed = list(create_dataloader(shards, "train", 4, skip_batches=2, **kw))
    assert [b["key"] for b in resumed] == [b["key"] for b in full[2:]]
    assert torch.equal(resumed[0]["image"], full[2]["image"])


def test_online_augment_is_seeded_and_changes_images(make_shards):
    shards = make_shards(COUNTS)
    aug = [
        TransformSpec(
            name="RandomBrightnessContrast",
            params={"brightness_limit": 0.5, "contrast_limit": 0.5, "p": 1.0},
        )
    ]
    plain = next(iter(create_dataloader(shards, "val", 4)))["image"]
    a = next(iter(create_dataloader(shards, "val", 4, augment=aug, seed=1)))["image"]
    b = next(iter(create_dataloader(shards, "val", 4, augment=aug, seed=1, num_workers=1)))["image"]
    c = next(iter(create_dataloader(shards, "val", 4, augment=aug, seed=1, epoch=1)))["image"]
    assert not torch.equal(a, plain)
    assert torch.equal(a, b)  # same seed, other process
    assert not torch.equal(a, c)  # the epoch is part of the seed


def test_bad_augment_spec_is_an_input_error(make_shards):
    shards = make_shards(COUNTS)
    with pytest.raises(
        InputError, match="RandomBrightnesContrast.*did you mean RandomBrightnessContrast"
    ):
        create_dataloader(shards, "val", 4, augment=[TransformSpec(name="RandomBrightnesContrast")])


def _rewrite_shard(shards, name: str, change) -> None:
    """Rewrite a shard's members through ``change(member_name, data)`` and re-hash it in the
    manifest, as if `mmpipe shard` had written those bytes (its size and sha256 match)."""
    path = shards / name
    with tarfile.open(path) as tf:
        members = [(m, change(m.name, tf.extractfile(m).read())) for m in tf.getmembers()]
    with tarfile.open(path, "w") as tf:
        for m, data in members:
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    manifest = json.loads((shards / "manifest.json").read_text())
    for entry in (e for split in manifest["splits"].values() for e in split["shards"]):
        if entry["name"] == name:
            entry.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (shards / "manifest.json").write_text(json.dumps(manifest))


def test_an_undecodable_sample_fails_the_pass_naming_its_shard(make_shards):
    shards = make_shards({"train": [3]})
    _rewrite_shard(shards, "train-000000.tar",
                   lambda name, data: b"not a jpeg" if name == "train00001.jpg" else data)  # fmt: skip
    with pytest.raises(InputError, match=r"read 2 of 3 expected samples, 1 unreadable \(shards: "
                       r"train-000000.tar\).*max_bad_samples=0.*train00001"):  # fmt: skip
        keys_of(create_dataloader(shards, "train", 8))


def test_bad_samples_within_the_allowance_are_counted_and_named(make_shards, caplog):
    shards = make_shards({"train": [3]})
    _rewrite_shard(shards, "train-000000.tar",
                   lambda name, data: b"not a jpeg" if name == "train00001.jpg" else data)  # fmt: skip
    loader = create_dataloader(shards, "train", 8, max_bad_samples=1)
    assert keys_of(loader) == ["train00000", "train00002"]
    assert (loader.stats["samples"], loader.stats["skipped"]) == (2, 1)
    assert loader.stats["bad"][0].startswith("train-000000.tar: sample train00001")
    assert "train00001" in caplog.text and "read 2 of 3 expected" in caplog.text


def test_a_truncated_shard_is_refused_naming_it_and_its_manifest_entry(make_shards):
    shards = make_shards(COUNTS)
    path = shards / "train-000001.tar"
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.truncate(size - 1024)
    with pytest.raises(InputError, match=rf"train-000001.tar: {size - 1024} bytes but manifest"
                       rf".json's train entry 'train-000001.tar' says {size}"):  # fmt: skip
        create_dataloader(shards, "train", 4)


def test_flipped_bytes_are_caught_by_the_sha256_pass(make_shards):
    shards = make_shards(COUNTS)
    path = shards / "train-000002.tar"
    data = bytearray(path.read_bytes())
    start = data.find(b"\xff\xd8") + 200  # inside a JPEG: the tar itself still reads fine
    data[start : start + 32] = bytes(b ^ 0xFF for b in data[start : start + 32])
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"train-000002.tar: sha256 .* but manifest.json's train "
                       r"entry 'train-000002.tar' says .*corrupted or modified"):  # fmt: skip
        create_dataloader(shards, "train", 4)
    assert keys_of(create_dataloader(shards, "val", 4))  # other shards still read


def test_a_shard_replaced_after_the_check_fails_when_opened(make_shards):
    shards = make_shards(COUNTS)
    loader = create_dataloader(shards, "train", 4)  # verified now
    with (shards / "train-000000.tar").open("ab") as fh:
        fh.write(b"\0" * 512)
    with pytest.raises(InputError, match="train-000000.tar: .* bytes, manifest.json says"):
        keys_of(loader)


def test_iterate_split_and_manifest(make_shards):
    shards = make_shards(COUNTS)
    samples = list(iterate_split(shards, "val"))
    assert [s["__key__"] for s in samples] == [f"val{n:05d}" for n in range(4)]
    assert samples[0]["txt"] == "caption 0" and samples[0]["json"]["label_index"] == 0
    assert samples[0]["jpg"][:2] == b"\xff\xd8"
    assert read_manifest(shards).count("val") == 4


def test_missing_inputs_are_input_errors(tmp_path, make_shards):
    with pytest.raises(InputError, match="run `mmpipe shard` first"):
        create_dataloader(tmp_path, "train", 2)
    shards = make_shards(COUNTS)
    with pytest.raises(InputError, match="no split 'test'"):
        create_dataloader(shards, "test", 2)
    (shards / "val-000000.tar").unlink()
    with pytest.raises(
        InputError, match="val-000000.tar: listed in manifest.json.s val entry .* but missing"
    ):
        create_dataloader(shards, "val", 2)
    (shards / "manifest.json").write_text(json.dumps({"oops": 1}))
    with pytest.raises(InputError, match="no 'splits'"):
        read_manifest(shards)
