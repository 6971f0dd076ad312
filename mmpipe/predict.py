"""Inference: load a trained model, embed images and captions, search and classify.

    predictor = load_predictor("models")  # models/best.pt (else last.pt), or a checkpoint file
    predictor.search_captions("cat.jpg", ["a cat", "a dog"], k=1)
    predictor.classify_pair("cat.jpg", "a cat on a mat")
    predictor.caption_images(["cat.jpg"], beam=3)  # a train.task=captioning model

A registered model (``models:/mmpipe-fusion@champion``) is fetched by ``mmpipe.tracking``
(``resolve_model``), which hands its checkpoint and sidecar to ``load_predictor``.

Images go through the same preprocessing as the shards the model was trained on
(``mmpipe.shard``'s function: EXIF transpose, RGB, square resize, JPEG round trip) and the
loader's normalisation, so a file scores the same here as in evaluation.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmpipe.checkpoint import load_model, pick_checkpoint
from mmpipe.config import AudioParams
from mmpipe.errors import InputError
from mmpipe.manifest import MANIFEST, Manifest, read_manifest
from mmpipe.model import predict_labels
from mmpipe.ood import Profile, load_profile
from mmpipe.taskspec import task_spec

log = logging.getLogger(__name__)

ImageInput = str | Path | bytes | Image.Image
AudioInput = str | Path | None  # a clip file, or None: the sample has no clip (masked)


@dataclass
class Predictor:
    """A loaded model plus what inference needs to feed it (image size, class names, task)."""

    model: torch.nn.Module
    image_size: int
    classes: list[str]
    task: str = "multiclass"
    source: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    training: dict[str, Any] | None = None  # what it was trained on (mmpipe.modelcard)
    profile: Profile | None = None  # the training data's embedding profile (mmpipe.ood)
    audio_limits: AudioParams = field(default_factory=AudioParams)  # ingest.audio's checks
    decode: str = "reduced"  # shard.decode of the shards it was trained on

    def describe(self) -> dict[str, Any]:
        """JSON-able settings (stored beside a logged model)."""
        out: dict[str, Any] = {
            "image_size": self.image_size,
            "decode": self.decode,
            "classes": self.classes,
            "task": self.task,
        }
        if self.training is not None:
            out["training"] = self.training
        return out

    def trained_on(self) -> str:
        """What the model was trained on, in one line (from its model card's data summary)."""
        from mmpipe.modelcard import trained_on

        if self.training is None:
            return "unknown (a checkpoint outside the registry carries no data summary)"
        return trained_on(self.training)

    @torch.no_grad()
    def input_warnings(
        self, images: Sequence[ImageInput] = (), captions: Sequence[str] = ()
    ) -> list[str]:
        """A warning per input unlike the training data (none without a profile): mmpipe.ood."""
        from mmpipe.ood import image_statistics

        if self.profile is None:
            return []
        x = self.load_images(images) if images else None
        scores = self.profile.scores(
            pixels=None if x is None else image_statistics(x.cpu()),
            image_emb=None if x is None else self.model.encode_image(x).float().cpu(),
            captions=list(captions),
            caption_emb=self.embed_captions(captions) if captions else None,
        )
        names = {"image": [_name(i) for i in images], "caption": list(captions)}
        return self.profile.warnings(scores, names)

    def load_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Preprocess images exactly like the shards + loader: (B, 3, S, S) normalised."""
        return torch.stack([self.image_tensor(img) for img in images]).to(self.device)

    def image_tensor(self, image: ImageInput) -> torch.Tensor:
        """One image preprocessed like the shards + loader: (3, S, S) normalised, on the CPU;
        InputError naming it when it cannot be read."""
        from mmpipe.data import decode_image

        jpg = _preprocess(image, self.image_size, self.decode)  # bytes, as stored in shards
        return decode_image(jpg)  # (3, S, S)

    @torch.no_grad()
    def embed_images(self, images: Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        """(N, D) L2-normalised image embeddings."""
        out = [
            self.model.encode_image(self.load_images(images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out).cpu() if out else torch.empty(0, 0)

    @torch.no_grad()
    def embed_captions(self, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """(N, D) L2-normalised caption embeddings."""
        out = [
            self.model.encode_text(list(captions[i : i + batch_size]))
            for i in range(0, len(captions), batch_size)
        ]
        return torch.cat(out).cpu() if out else torch.empty(0, 0)

    def search_captions(
        self, image: ImageInput, captions: Sequence[str], k: int = 5
    ) -> list[dict[str, Any]]:
        """The k captions most similar to ``image``: [{"rank", "index", "caption", "score"}]."""
        return self._search(self.embed_images, image, self.embed_captions, captions, k, "caption")

    def search_images(
        self, caption: str, images: Sequence[ImageInput], k: int = 5
    ) -> list[dict[str, Any]]:
        """The k images most similar to ``caption``: [{"rank", "index", "image", "score"}]."""
        return self._search(self.embed_captions, caption, self.embed_images, images, k, "image")

    @staticmethod
    def _search(
        embed_query: Any, query: Any, embed: Any, candidates: Sequence[Any], k: int, kind: str
    ) -> list[dict[str, Any]]:
        """The k ``candidates`` (of ``kind``) closest to ``query`` in the shared space."""
        if not candidates:
            raise InputError(f"search: no candidate {kind}s given")
        scores = (embed_query([query]) @ embed(candidates).T)[0]  # (N,)
        # stable: equal scores keep candidate order
        top = np.argsort(-scores.numpy(), kind="stable")[: max(k, 0)]
        return [
            {"rank": r + 1, "index": int(i), kind: _name(candidates[i]), "score": float(scores[i])}
            for r, i in enumerate(top)
        ]

    def load_audio(self, clips: Sequence[AudioInput]) -> dict[str, torch.Tensor]:
        """The forward's audio arguments, each clip validated and featurised exactly as ingest
        and shard do (mono 16 kHz FLAC -> log-mel); a None clip is masked. {} when the model
        has no audio encoder and no clip is given."""
        from mmpipe.audio import FRAMES, N_MELS

        has_encoder = getattr(self.model, "audio_encoder", None) is not None
        if not has_encoder:
            if any(c is not None for c in clips):
                raise InputError(f"{self.source}: the model was trained without audio")
            return {}
        audio = torch.zeros(len(clips), 1, N_MELS, FRAMES)
        for i, clip in enumerate(clips):
            if clip is not None:
                audio[i] = torch.from_numpy(_clip_features(clip, self.audio_limits))
        mask = torch.tensor([c is not None for c in clips])
        return {"audio": audio.to(self.device), "audio_mask": mask.to(self.device)}

    @torch.no_grad()
    def classify_pairs(
        self,
        images: Sequence[ImageInput],
        captions: Sequence[str],
        audio: Sequence[AudioInput] | None = None,
    ) -> list[dict[str, Any]]:
        """Task-head prediction + image/caption cosine similarity for each (image, caption);
        a tri-modal model also takes each pair's clip in ``audio`` (None or absent: masked)."""
        if len(images) != len(captions):
            raise InputError(f"{len(images)} images but {len(captions)} captions")
        clips = list(audio) if audio is not None else [None] * len(images)
        if len(clips) != len(images):
            raise InputError(f"{len(images)} images but {len(clips)} audio clips")
        extra = self.load_audio(clips)
        out = self.model(self.load_images(images), list(captions), **extra)
        sims = (out["image_emb"] * out["text_emb"]).sum(-1).cpu()  # (B,)
        if task_spec(self.task).captions:  # the "label" of a pair is the image's caption
            rows = [{"label": c, "label_index": -1, "confidence": None}
                    for c in self.caption_images(images)]  # fmt: skip
        else:
            rows = decode_logits(out["logits"].float().cpu(), self.task, self.classes)
        for row, sim in zip(rows, sims.tolist(), strict=True):
            row["similarity"] = sim
        return rows

    @torch.no_grad()
    def caption_images(self, images: Sequence[ImageInput], beam: int = 3) -> list[str]:
        """A generated caption per image (a captioning model; beam 1 = greedy)."""
        if not task_spec(self.task).captions or getattr(self.model, "decoder", None) is None:
            raise InputError(
                f"{self.source}: a {self.task} model has no caption decoder; caption with a "
                "model trained with train.task=captioning"
            )
        if beam < 1:
            raise InputError(f"beam={beam}: needs at least 1 (1 = greedy)")
        encoded = self.model.image_encoder.encode(self.load_images(images))
        return self.model.decoder.generate(encoded, beam)

    def classify_pair(
        self, image: ImageInput, caption: str, audio: AudioInput = None
    ) -> dict[str, Any]:
        """One pair (+ its clip): {"label", "label_index", "confidence", "probabilities",
        "similarity"}."""
        return self.classify_pairs([image], [caption], [audio])[0]

    def predict_frame(self, frame: Any) -> Any:
        """In-process DataFrame[image (base64 or path), caption] -> DataFrame of predictions (the
        served model takes base64 only: ``mmpipe.serving``)."""
        import pandas as pd

        missing = {"image", "caption"} - set(frame.columns)
        if missing:
            raise InputError(f"input frame lacks column(s) {sorted(missing)}")
        images = [_image_from_cell(v, i) for i, v in enumerate(frame["image"].tolist())]
        rows = self.classify_pairs(images, [str(c) for c in frame["caption"].tolist()])
        return pd.DataFrame(
            {
                "label": [str(r["label"]) for r in rows],
                "label_index": [int(r["label_index"]) for r in rows],
                "confidence": [_float(r["confidence"]) for r in rows],
                "similarity": [float(r["similarity"]) for r in rows],
            }
        )


def decode_logits(logits: torch.Tensor, task: str, classes: Sequence[str]) -> list[dict[str, Any]]:
    """Turn task-head logits (B, C) into per-row predictions for the configured task.

    multilabel: ``label`` joins every class with probability > 0.5 by "|" (``labels`` lists
    them); vqa: ``label`` is the answer. A model trained without labels has no task prediction.
    ``confidence`` is None where there is none (regression, no labels): JSON has no NaN.
    """
    decode = task_spec(task).decode
    if decode == "value":
        return [
            {"label": f"{v:.6g}", "label_index": -1, "confidence": None, "value": float(v)}
            for v in logits.reshape(len(logits), -1)[:, 0].tolist()
        ]
    if not classes:  # an untrained head's outputs mean nothing: say so instead
        note = "the model was trained without labels (retrieval only): no task prediction"
        return [{"label": "", "label_index": -1, "confidence": None, "note": note}
                for _ in range(len(logits))]  # fmt: skip
    names = list(classes)
    if decode == "multi_hot":
        return _decode_multilabel(logits, names)
    if decode == "positive" or logits.shape[-1] == 1:
        probs = torch.sigmoid(logits)
        if probs.shape[-1] == 1:  # one logit: P(class 1)
            probs = torch.cat([1 - probs, probs], dim=-1)
    else:
        probs = torch.softmax(logits, dim=-1)
    idx = predict_labels(logits, task)  # (B,)
    conf = probs.gather(-1, idx[:, None])[:, 0]  # (B,)
    return [
        {
            "label": names[i] if i < len(names) else str(i),
            "label_index": i,
            "confidence": c,
            "probabilities": {
                (names[j] if j < len(names) else str(j)): p for j, p in enumerate(row)
            },
        }
        for i, c, row in zip(idx.tolist(), conf.tolist(), probs.tolist(), strict=True)
    ]


def _decode_multilabel(logits: torch.Tensor, names: list[str]) -> list[dict[str, Any]]:
    """Every class above 0.5; label_index and confidence are those of the most likely class."""
    probs = torch.sigmoid(logits.float())  # (B, K)
    hot = predict_labels(logits, "multilabel")  # (B, K)
    rows = []
    for p, h in zip(probs.tolist(), hot.tolist(), strict=True):
        chosen = [names[j] for j, on in enumerate(h) if on and j < len(names)]
        top = max(range(len(p)), key=p.__getitem__)
        rows.append({
            "label": "|".join(chosen), "labels": chosen, "label_index": top,
            "confidence": p[top],
            "probabilities": {names[j] if j < len(names) else str(j): q for j, q in enumerate(p)},
        })  # fmt: skip
    return rows


def _float(value: float | None) -> float:
    """A DataFrame cell: None (no confidence) is pandas' missing value."""
    return float("nan") if value is None else float(value)


def _name(item: ImageInput) -> str:
    """A caption or an image path as given; an in-memory image as <type>."""
    return str(item) if isinstance(item, str | Path) else f"<{type(item).__name__}>"


def _preprocess(image: ImageInput, size: int, decode: str = "reduced") -> bytes:
    """A path / bytes / PIL image as the stored sample's JPEG bytes; unreadable input names the file.

    The file is opened, not loaded, before ``shard.preprocess_image``: a large JPEG is then
    decoded at the same reduced scale as in shard, so a file scores here as in evaluation.
    """
    from mmpipe.shard import preprocess_image

    if isinstance(image, Image.Image):
        return preprocess_image(image, size, decode=decode)
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else Path(image)) as img:
            return preprocess_image(img, size, decode=decode)
    except FileNotFoundError:
        raise InputError(f"{image}: image file not found") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InputError(f"{_name(image)}: not a readable image ({exc})") from None


def _clip_features(clip: str | Path, limits: AudioParams) -> np.ndarray:
    """A clip file -> (1, N_MELS, FRAMES) log-mel as in shards; a clip ingest would reject is
    an InputError naming the file and the reason."""
    from mmpipe.audio import check_audio_bytes, clip_features, encode_flac

    try:
        data = Path(clip).read_bytes()
    except OSError as exc:
        raise InputError(f"{clip}: cannot read the audio clip ({exc.strerror})") from None
    reason, detail, _ = check_audio_bytes(data, limits)
    if reason is not None:
        raise InputError(f"{clip}: audio clip rejected: {reason} ({detail})")
    return np.asarray(clip_features(encode_flac(clip)))


def _image_from_cell(value: Any, row: int) -> ImageInput:
    """A pyfunc ``image`` cell: raw bytes, an existing file path, or base64 of the bytes."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    text = str(value)
    if _is_file(text):
        return Path(text)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"row {row}: image is neither a file path nor base64 data") from None


def _is_file(text: str) -> bool:
    """Whether ``text`` names an existing file; False for what cannot be a path (base64 data:
    a segment over the file-name limit raises "File name too long", a NUL raises ValueError)."""
    try:
        return len(text) < 4096 and Path(text).is_file()
    except (OSError, ValueError):
        return False


def load_predictor(
    source: str | Path,
    *,
    sidecar: dict[str, Any] | None = None,
    shard_dir: str | Path | None = None,
    image_size: int | None = None,
    classes: list[str] | None = None,
    device: str = "cpu",
) -> Predictor:
    """A predictor of a checkpoint file, or of a models directory's best.pt (else last.pt).

    Image size and class names come from the arguments, else the ``sidecar`` of a logged model,
    else the checkpoint, else the manifest in ``shard_dir`` (the shards it was trained on).
    """
    checkpoint = pick_checkpoint(source)
    model, info = load_model(checkpoint)
    model.to(device)
    sidecar = sidecar or {}
    # without the shards' manifest: the defaults of a manifest that records nothing
    manifest = Manifest(splits={})
    if shard_dir is not None and (Path(shard_dir) / MANIFEST).is_file():
        manifest = read_manifest(shard_dir)
    size = image_size or sidecar.get("image_size") or info.get("image_size")
    size = size or manifest.image_size
    if not size:
        raise InputError(
            f"{checkpoint}: image size unknown (not in the checkpoint, and no shard manifest "
            f"in {shard_dir}); pass image_size="
        )
    names = classes or sidecar.get("classes") or info.get("classes") or manifest.classes
    task = sidecar.get("task") or info["model_args"]["task"]
    profile = sidecar.get("profile_file")
    decode = sidecar.get("decode") or info.get("decode") or manifest.decode
    return Predictor(
        model, int(size), list(names or []), task, str(checkpoint), torch.device(device),
        training=sidecar.get("training"), profile=load_profile(profile) if profile else None,
        decode=decode,
    )  # fmt: skip


def hf_predictor(name: str, *, allow_download: bool = False, device: str = "cpu") -> Predictor:
    """A pretrained dual encoder as it ships (``hf:<id or directory>`` of a CLIP/SigLIP): its
    own projections and temperature, images at its processor's size (decoded at full resolution,
    like its processor), for zero-shot retrieval and classification without training."""
    from mmpipe.config import ModelConfig
    from mmpipe.model import create_model
    from mmpipe.model.hf import expected_image_size

    model = create_model(ModelConfig(pretrained=name), 0, allow_download=allow_download)
    wanted = expected_image_size(model.hf_specs)
    if wanted is None:
        raise InputError(f"{name}: its processor config names no image size")
    return Predictor(model.eval().to(device), wanted[1], [], "multiclass", name,
                     torch.device(device), decode="full")  # fmt: skip
