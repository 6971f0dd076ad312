"""mmpipe.data: batches, shuffling, rank splitting, workers, resume, skip counting."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from mmpipe.checkpoint import read_manifest
from mmpipe.config import TransformSpec
from mmpipe.data import create_dataloader, decode_image, iterate_split
from mmpipe.errors import InputError

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


def test_corrupt_sample_is_counted_not_silently_dropped(make_shards, caplog):
    shards = make_shards({"train": [3]})
    path = shards / "train-000000.tar"
    members = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            data = tf.extractfile(m).read()
            members.append((m, b"not a jpeg" if m.name == "train00001.jpg" else data))
    with tarfile.open(path, "w") as tf:
        for m, data in members:
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    loader = create_dataloader(shards, "train", 8)
    keys = keys_of(loader)
    assert keys == ["train00000", "train00002"]
    assert loader.stats == {"samples": 2, "skipped": 1, "expected": 3}
    assert "train00001" in caplog.text and "2 of 3 expected" in caplog.text


def test_iterate_split_and_manifest(make_shards):
    shards = make_shards(COUNTS)
    samples = list(iterate_split(shards, "val"))
    assert [s["__key__"] for s in samples] == [f"val{n:05d}" for n in range(4)]
    assert samples[0]["txt"] == "caption 0" and samples[0]["json"]["label_index"] == 0
    assert samples[0]["jpg"][:2] == b"\xff\xd8"
    assert read_manifest(shards)["splits"]["val"]["count"] == 4


def test_missing_inputs_are_input_errors(tmp_path, make_shards):
    with pytest.raises(InputError, match="run `mmpipe shard` first"):
        create_dataloader(tmp_path, "train", 2)
    shards = make_shards(COUNTS)
    with pytest.raises(InputError, match="no split 'test'"):
        create_dataloader(shards, "test", 2)
    (shards / "val-000000.tar").unlink()
    with pytest.raises(InputError, match="val-000000.tar: listed in manifest.json but missing"):
        create_dataloader(shards, "val", 2)
    (shards / "manifest.json").write_text(json.dumps({"oops": 1}))
    with pytest.raises(InputError, match="no 'splits'"):
        read_manifest(shards)
