"""Captioning (train.task=captioning): the decoder learns the captions of tiny shards well
enough to beat the nearest-neighbour and constant-caption baselines on BLEU-4, and its beam
search returns valid text."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from mmpipe import captioning
from mmpipe.checkpoint import load_model, pick_checkpoint
from mmpipe.config import EvaluateParams
from mmpipe.evaluate import caption_result, embed_split
from mmpipe.model.decoder import SPECIALS, build_vocabulary
from mmpipe.train import run_train
from tests.conftest import colour_image, shard_hashes, tiny_train_params

COLOURS, SHAPES = ("red", "orange", "blue", "teal"), ("circle", "square")
LEADS = ("wow", "look", "see", "honestly")


def caption(rng: random.Random, colour: str, shape: str) -> str:
    """'there is a red circle', a third after a random lead word ('look there is a ...')."""
    text = f"there is a {colour} {shape}"
    return f"{rng.choice(LEADS)} {text}" if rng.random() < 0.35 else text


def write_caption_shards(
    root: Path, n_images: dict[str, int], per_image: int = 2, make_caption=caption
) -> Path:
    """Shards of colour_image()s with unlabelled captions as the shard stage stores them."""
    from mmpipe.io import write_json_atomic
    from mmpipe.shard import preprocess_image

    rng, splits = random.Random(0), {}
    root.mkdir(parents=True, exist_ok=True)
    for split, n in n_images.items():
        name = f"{split}-000000.tar"
        with tarfile.open(root / name, "w") as tf:
            for i in range(n):
                colour, shape = COLOURS[i % 4], SHAPES[(i // 4) % 2]
                jpg = preprocess_image(colour_image(colour, shape), 32, 90)
                for c in range(per_image):
                    key = f"{split}{i:03d}c{c}"
                    meta = {"pair_id": key, "image_id": f"{split}img{i:03d}", "caption_id": key,
                            "label": None, "label_index": -1, "split": split, "meta": {},
                            "copy": 0}  # fmt: skip
                    for ext, data in (("jpg", jpg), ("txt", make_caption(rng, colour, shape).encode()),
                                      ("json", json.dumps(meta).encode())):  # fmt: skip
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))
        count = n * per_image
        splits[split] = {"count": count,
                         "shards": [{"name": name, "count": count, **shard_hashes(root / name)}]}  # fmt: skip
    manifest = {"image_size": 32, "classes": [], "splits": splits, "params_hash": "x",
                "labels": "none", "labelled_pairs_per_split": {s: 0 for s in splits}}  # fmt: skip
    write_json_atomic(root / "manifest.json", manifest)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny captioning model trained on 32 images (seconds on CPU)."""
    root = tmp_path_factory.mktemp("captioning")
    shards = write_caption_shards(root / "shards", {"train": 32, "val": 4, "test": 16})
    p = tiny_train_params(task="captioning", text_encoder="lstm", width=32, decoder_layers=1,
                          epochs=8, lr=1e-2)  # fmt: skip
    report = run_train(shards, p, root / "models")
    model, info = load_model(pick_checkpoint(root / "models"))
    return shards, model, info, report


def test_vocabulary_is_the_train_words_by_frequency_and_the_longest_caption_capped():
    spec = build_vocabulary(["A red circle.", "a blue circle here", "red"], 3, 10)
    assert spec == {"vocab": [*SPECIALS, "a", "circle", "red"], "max_len": 4}  # ties: a-z
    assert build_vocabulary(["one two three four five"], 10, 3)["max_len"] == 3


def test_captioning_trains_without_labels_and_stores_its_vocabulary(trained):
    _, model, info, report = trained
    assert report["task_loss"] == "on" and report["history"][-1]["train_task"] > 0
    first, last = report["history"][0]["train_task"], report["history"][-1]["train_task"]
    assert last < 0.5 * first  # the token loss goes down
    assert report["history"][-1]["train_labelled_pairs"] == 64  # pairs (32 images x 2), not tokens
    assert set(COLOURS) | set(SHAPES) | {"a"} <= set(info["caption"]["vocab"])
    assert model.decoder is not None and model.head is None


def test_decoder_beats_the_nearest_neighbour_and_constant_baselines_on_bleu4(trained):
    shards, model, _, _ = trained
    test = embed_split(model, shards, "test", 64)
    metrics = caption_result(model, shards, test, EvaluateParams(beam_size=3), None).metrics
    refs = captioning.group_references(test.image_ids, test.texts, test.text_to_image)
    train = [s["txt"] for s in captioning.iterate_split(shards, "train")]
    constant = Counter(train).most_common(1)[0][0]
    flat = captioning.caption_scores({i: constant for i in refs}, refs)
    assert metrics["n_caption_images"] == 16
    assert metrics["bleu4"] > metrics["nn_bleu4"], metrics
    assert metrics["bleu4"] > flat["bleu4"] + 0.2, (metrics, flat)
    assert metrics["cider"] > flat["cider"], (metrics, flat)


def test_beam_search_returns_valid_text_and_beam_one_is_greedy(trained):
    shards, model, info, _ = trained
    images = next(iter(captioning.create_dataloader(shards, "test", 16, shuffle_buffer=0)))
    encoded = model.image_encoder.encode(images["image"])
    vocab, cap = info["caption"]["vocab"], info["caption"]["max_len"]
    greedy = model.decoder.greedy(encoded)
    assert model.decoder.beam(encoded, 1) == greedy
    for size in (2, 4):
        for ids in model.decoder.beam(encoded, size):
            assert 1 <= len(ids) <= cap and all(i >= len(SPECIALS) for i in ids)
    for text in model.decoder.generate(encoded, beam=3):
        assert text and set(text.split()) <= set(vocab[len(SPECIALS) :])


def test_beam_search_prefers_the_likelier_caption_over_the_greedy_prefix():
    """A decoder whose first step favours a word that leads nowhere likely: beam search finds
    the caption greedy misses (the beams really are searched, not just the top-1 path)."""
    from mmpipe.model.decoder import BOS, EOS, CaptionDecoder
    from mmpipe.model.features import Encoded

    spec = {"vocab": [*SPECIALS, "x", "y", "z"], "max_len": 3}
    dec = CaptionDecoder(spec, 4, 8, 1, 0.0, 3)
    x, y, z = 4, 5, 6
    table = {(BOS,): {x: 0.45, y: 0.40, z: 0.15}, (BOS, x): {x: 0.3, y: 0.3, z: 0.4},
             (BOS, y): {EOS: 0.95, x: 0.05}}  # fmt: skip

    def fake_logits(ids, memory, valid):
        out = torch.full((*ids.shape, 7), -30.0)
        for b, row in enumerate(ids.tolist()):
            for tok, prob in table.get(tuple(t for t in row if t), {EOS: 1.0}).items():
                out[b, -1, tok] = torch.log(torch.tensor(prob))
        return out

    dec.logits = fake_logits  # type: ignore[method-assign]
    image = Encoded(torch.zeros(1, 4), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))
    assert dec.greedy(image) == [[x, z]]
    assert dec.beam(image, 2) == [[y]]


def test_captioning_registers_on_cider_with_or_without_labels():
    from mmpipe.manifest import Manifest
    from mmpipe.objectives import check_metric_for_data, check_metric_for_task

    unlabelled = Manifest(
        splits={}, labels="none", labelled_pairs_per_split={"train": 0, "test": 0}
    )
    assert check_metric_for_data(None, "captioning", unlabelled, [1]) == ("cider", True)
    assert check_metric_for_data("bleu4", "captioning", unlabelled, [1]) == ("bleu4", True)
    with pytest.raises(ValueError, match="not a metric of train.task='captioning'"):
        check_metric_for_task("accuracy", "captioning", [1])


def test_report_shows_the_scores_beside_the_baseline_and_example_captions(tmp_path):
    from mmpipe.io import write_json_atomic
    from mmpipe.report import render_markdown

    metrics = {"bleu4": 0.41, "cider": 1.25, "nn_bleu4": 0.22, "nn_cider": 0.75}
    write_json_atomic(tmp_path / "metrics.json", metrics)
    rows = [{"image_id": "abc", "thumbnail": "caption_00_abc.png", "generated": "a red circle",
             "nearest": "a blue circle", "references": ["a red circle", "one red circle"]}]  # fmt: skip
    write_json_atomic(tmp_path / "examples" / "captions.json", rows)
    text = render_markdown(tmp_path)
    assert "| decoder (beam search) | 0.4100 | 1.2500 |" in text
    assert "| nearest-neighbour train caption | 0.2200 | 0.7500 |" in text
    assert "examples/caption_00_abc.png" in text
    assert "generated: a red circle" in text and "references: a red circle / one red circle" in text


def test_init_from_a_captioning_checkpoint_keeps_its_vocabulary_rows_and_words(tmp_path):
    """Fine-tuning on captions whose vocabulary has the same size in another order: the new
    decoder uses the checkpoint's vocabulary, so each loaded row still means its word."""
    from mmpipe.checkpoint import read_checkpoint
    from mmpipe.distributed import init_distributed
    from mmpipe.manifest import read_manifest
    from mmpipe.train import caption_vocabulary, create_trainer

    def colour_twice(rng: random.Random, colour: str, shape: str) -> str:
        return f"{caption(rng, colour, shape)} {colour}"  # colours now tie with the shapes

    sizes = {"train": 16, "val": 2}
    first = write_caption_shards(tmp_path / "a", sizes)
    second = write_caption_shards(tmp_path / "b", sizes, make_caption=colour_twice)
    p = tiny_train_params(task="captioning", text_encoder="lstm", width=32, decoder_layers=1,
                          epochs=1)  # fmt: skip
    run_train(first, p, tmp_path / "source")
    source = read_checkpoint(tmp_path / "source" / "best.pt")
    own = caption_vocabulary(second, p)["vocab"]
    assert sorted(own) == sorted(source["caption"]["vocab"]) and own != source["caption"]["vocab"]
    warm = p.model_copy(update={"init_from": str(tmp_path / "source")})
    spec = caption_vocabulary(second, warm, tmp_path / "source" / "best.pt")
    t = create_trainer(warm, init_distributed("cpu"), read_manifest(second),
                       tmp_path / "source" / "best.pt", spec)  # fmt: skip
    assert t.model.decoder.vocab == source["caption"]["vocab"]
    assert torch.equal(t.model.decoder.embed.weight, source["model"]["decoder.embed.weight"])
    run_train(second, warm, tmp_path / "warm")
    warmed = read_checkpoint(tmp_path / "warm" / "best.pt")
    assert warmed["caption"]["vocab"] == source["caption"]["vocab"]


def test_decoding_never_repeats_a_trigram_of_its_own_caption():
    """A decoder that always prefers the same word: without the block it loops (x x x x x);
    greedy and beam search both stop each trigram from coming back."""
    from mmpipe.model.decoder import EOS, CaptionDecoder
    from mmpipe.model.features import Encoded

    dec = CaptionDecoder({"vocab": [*SPECIALS, "x", "y"], "max_len": 5}, 4, 8, 1, 0.0, 5)
    x, y = 4, 5

    def fake_logits(ids, memory, valid):
        out = torch.full((*ids.shape, 6), -30.0)
        out[:, -1, [x, y, EOS]] = torch.log(torch.tensor([0.9, 0.06, 0.04]))
        return out

    dec.logits = fake_logits  # type: ignore[method-assign]
    image = Encoded(torch.zeros(1, 4), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))
    assert dec.greedy(image) == [[x, x, x, y, x]] == dec.beam(image, 1)
    assert dec.beam(image, 3)[0] == [x, x, x, y, x]
    dec.no_repeat_ngram = 0
    assert dec.greedy(image) == [[x] * 5]
