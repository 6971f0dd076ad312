"""The embedded default dataset: procedurally generated scenes + captions, no download.

The task is *sentiment consistency*: does the caption's sentiment agree with the image's mood?
Neither modality alone says anything about the label; only the two together do.

Generative rules (every random draw comes from a numpy Generator seeded with ``(seed, index)``,
so image ``index`` is the same whatever ``n_images`` is and whichever process renders it):

1. Mood. Each image has a mood, ``positive`` or ``negative`` (50/50). The background is a smooth
   linear gradient (random direction) between two colours of the mood's palette: WARM (reds,
   oranges, yellows) for positive, COOL (blues, teals, purples) for negative.
2. Ambiguous images. 10 % of images (``AMBIGUOUS_FRACTION``) blend their palette 80 % towards
   neutral grey: the mood is still decided, but only weakly visible, so the ceiling is below 100 %.
3. Objects. 1-3 objects at distinct grid positions (left, right, top, bottom, centre; jittered by
   a few pixels), so no object hides another completely. Each has a shape (circle, square,
   triangle, star, cross), a colour (red, green, blue, yellow, white, black, purple, orange) and a
   size (small, large). The first object is the *main* object: drawn last (on top) and strictly
   the largest (other objects are 3/4 of their size class and small when the main one is small).
   ``main_shape`` is its shape. Objects get a thin contrasting outline so a yellow star stays
   visible on a yellow background.
4. Texture. Mild uniform pixel noise (+-8 levels) on the background; JPEG quality 90.
5. Captions. ``captions_per_image`` captions per image. Each always names the main object's
   colour and shape, often (60 %) its size and (60 %) its position, and each other object with
   probability 40 %. Colours, sizes and positions use synonyms ("crimson", "big", "in the
   middle"); shape nouns stay recognisable (mostly the class word, sometimes "disc", "plus sign").
   One of seven templates sets the word order; 30 % get a distractor lead ("Honestly,",
   "I think", "In this picture,").
6. Sentiment. Each caption carries a sentiment word, positive (cheerful, lovely, delightful,
   bright, happy, wonderful) or negative (gloomy, dreary, sad, bleak, depressing, miserable),
   50/50 and independent of the image's mood and of the other captions.
7. Label. ``consistent`` if mood == sentiment, else ``inconsistent``; then flipped with
   probability ``label_noise``. Mood and sentiment are independent fair coins, so each is
   independent of the label on its own: a unimodal model is at chance, a fused one is not.

Other labels (``label``), from the same scenes and captions (the images are identical):

* ``sentiment``: ``positive`` when mood and caption sentiment are both positive, ``negative``
  when both are negative, else ``mixed`` (3 classes; each modality alone narrows it to two).
* ``score``: a 1-5 rating, 3 + the mood (+-0.9, +-0.27 when ambiguous) + 0.9 x the sentiment
  word's strength (+-0.4 to +-1, ``WORD_STRENGTH``) + Gaussian noise (sd 0.25), clipped to
  [1, 5]: the image explains one part, the caption the other (regression).
* ``tags``: the shapes in the image plus the caption's sentiment (``positive``/``negative``),
  '|'-separated: the image shows every shape, the caption only some, and only the caption has
  the sentiment (multilabel).

Question mode (``questions``, VQA): instead of captions, ``captions_per_image`` questions per
image, each answerable only from the image: "what colour is the star?" (a shape that occurs
once; 8 colours), "how many circles are there?" (any shape, 0-3, answers written as words or
digits: the VQA normalisation maps both to digits), "is the square left of the cross?" (two
objects at different heights of the grid's columns; yes/no). From the question alone a model is
at the answer prior of its type.

Audio (``audio``): each image also gets ``out_dir/audio/{index:06d}.wav`` (16 kHz mono, 1 s): a
chord on one of four roots, major when the mood is positive and minor when negative, so the clip
is a second mood cue that stays clear when the palette is ambiguous; ``AUDIO_MISSING_FRACTION``
of the images get none (empty ``audio`` cell: the modality is masked). Its draws come from a
generator of their own (seed, index, 1), so images and captions are those of ``audio: false``.

Output: ``out_dir/images/{index:06d}.jpg`` and ``out_dir/captions.csv`` with columns image
(relative path), caption, label, main_shape, mood, sentiment (question mode: image, question,
answer, question_type, main_shape, mood). ``out_dir/.complete`` holds the hash
of the params and of this module's source; when it matches, generation is skipped.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmpipe.config import SyntheticParams, section_hash
from mmpipe.parallel import process_pool
from mmpipe.progress import tqdm  # a bar on a terminal, a log line every minute elsewhere

log = logging.getLogger(__name__)

COLUMNS = ("image", "caption", "label", "main_shape", "mood", "sentiment")
QUESTION_COLUMNS = ("image", "question", "answer", "question_type", "main_shape", "mood")
LABEL_SEPARATOR = "|"  # between the tags of label=tags
COMPLETE = ".complete"
AMBIGUOUS_FRACTION = 0.10
JPEG_QUALITY = 90
# Below this many images a process pool costs more than it saves.
POOL_MIN_IMAGES = 1000
AUDIO_RATE = 16_000
AUDIO_MISSING_FRACTION = 0.05
CHORD_ROOTS_HZ = (440.0, 493.88, 523.25, 587.33)  # A4, B4, C5, D5
CHORDS = {"positive": (0, 4, 7), "negative": (0, 3, 7)}  # semitones: major, minor triad

WARM = ((220, 40, 30), (240, 120, 20), (250, 200, 40), (210, 70, 90), (235, 160, 60))
COOL = ((30, 60, 200), (20, 150, 160), (120, 50, 170), (40, 110, 220), (60, 40, 120))
GREY = np.array((128.0, 128.0, 128.0))

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
# (x, y) centre of each grid position, as a fraction of the side.
POSITIONS = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "centre": (0.5, 0.5),
}
POSITION_NAMES = tuple(POSITIONS)
RADIUS = {"small": 0.10, "large": 0.17}  # fraction of the side
SECONDARY_SCALE = 0.75


def _words(table: str) -> dict[str, tuple[str, ...]]:
    """``key: word | word | ...`` lines -> {key: (word, ...)}: synonyms, in sampling order."""
    rows = (line.split(":", 1) for line in table.strip().splitlines())
    return {key.strip(): tuple(w.strip() for w in words.split("|")) for key, words in rows}


# A repeated word is more likely to be drawn ("circle" 3 of 4 times, "disc" 1 of 4).
COLOUR_WORDS = _words("""
    red: red | crimson | scarlet
    green: green | emerald | lime
    blue: blue | azure | navy
    yellow: yellow | golden | lemon
    white: white | snowy | ivory
    black: black | jet-black | ebony
    purple: purple | violet | lilac
    orange: orange | tangerine | amber
""")
SHAPE_WORDS = _words("""
    circle: circle | circle | circle | disc
    square: square
    triangle: triangle
    star: star | star | star | five-pointed star
    cross: cross | cross | cross | plus sign
""")
SIZE_WORDS = _words("""
    small: small | little | tiny
    large: large | big | huge
""")
POSITION_WORDS = _words("""
    left: on the left | at the left side | to the left
    right: on the right | at the right side | to the right
    top: at the top | near the top | up high
    bottom: at the bottom | near the bottom | down low
    centre: in the centre | in the middle | at the center
""")

SENTIMENT_WORDS = {
    "positive": ("cheerful", "lovely", "delightful", "bright", "happy", "wonderful"),
    "negative": ("gloomy", "dreary", "sad", "bleak", "depressing", "miserable"),
}
# how strongly each sentiment word pushes a `score` rating (label=score)
WORD_STRENGTH = {
    "cheerful": 0.6, "lovely": 0.8, "delightful": 1.0, "bright": 0.4, "happy": 0.7,
    "wonderful": 1.0, "gloomy": 0.6, "dreary": 0.5, "sad": 0.8, "bleak": 0.7,
    "depressing": 1.0, "miserable": 1.0,
}  # fmt: skip
COUNT_WORDS = ("zero", "one", "two", "three")
LEADS = ("Honestly, ", "I think ", "In this picture, ", "As you can see, ")
LINKS = (" and ", " next to ", " beside ")


def params_digest(p: SyntheticParams) -> str:
    """Hash of the params and of this module's code: what the generated files depend on."""
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return hashlib.sha256(f"{section_hash(p)}:{code}".encode()).hexdigest()[:32]


def generate(out_dir: Path, p: SyntheticParams, *, workers: int | None = None) -> dict[str, Any]:
    """Write the synthetic dataset to ``out_dir`` (skipped when ``.complete`` matches ``p``)."""
    out_dir = Path(out_dir)
    digest = params_digest(p)
    n_captions = p.n_images * p.captions_per_image
    marker = out_dir / COMPLETE
    if marker.is_file() and marker.read_text().strip() == digest:
        log.info("synthetic data in %s is current (%s), skipping", out_dir, digest)
        return {"n_images": p.n_images, "n_captions": n_captions, "seconds": 0.0, "skipped": True}
    start = time.perf_counter()
    # written in place: ingest generates into its staging directory (mmpipe.commit), so a kill
    # leaves nothing a reader sees; .complete goes last, so a half-written dir never looks done
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "images").mkdir(parents=True)
    if p.audio:
        (out_dir / "audio").mkdir()
    _write_all(out_dir, p, workers or os.cpu_count() or 1)
    (out_dir / COMPLETE).write_text(digest + "\n")
    seconds = time.perf_counter() - start
    rate = p.n_images / seconds if seconds > 0 else 0.0
    log.info("generated %d images in %.2fs (%.0f images/s)", p.n_images, seconds, rate)
    return {
        "n_images": p.n_images,
        "n_captions": n_captions,
        "seconds": round(seconds, 3),
        "images_per_second": round(rate, 1),
        "skipped": False,
    }


def _write_all(tmp: Path, p: SyntheticParams, workers: int) -> None:
    """Render every image (in a pool when large) and stream the caption rows to the CSV."""
    job = functools.partial(_make_rows, p=p, out_dir=str(tmp))
    with (tmp / "captions.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        header = QUESTION_COLUMNS if p.questions else COLUMNS
        writer.writerow((*header, "audio") if p.audio else header)
        indices = range(p.n_images)
        bar = dict(total=p.n_images, desc="synthetic", unit="img", disable=None)
        if workers > 1 and p.n_images >= POOL_MIN_IMAGES:
            with process_pool(workers) as pool:
                # imap keeps the order, so the CSV is identical whatever the worker count.
                for rows in tqdm(pool.imap(job, indices, chunksize=64), **bar):
                    writer.writerows(rows)
        else:
            for rows in tqdm(map(job, indices), **bar):
                writer.writerows(rows)


def _make_rows(index: int, p: SyntheticParams, out_dir: str) -> list[tuple[str, ...]]:
    """Image ``index``'s caption rows, with its clip's path appended when ``p.audio``."""
    rows = _make_one(index, p, os.path.join(out_dir, "images"))
    if not p.audio:
        return rows
    mood = rows[0][4] if not p.questions else rows[0][5]
    clip = write_chord(index, p.seed, mood, os.path.join(out_dir, "audio"))
    return [(*row, clip) for row in rows]


def write_chord(index: int, seed: int, mood: str, audio_dir: str) -> str:
    """Write clip ``index`` (a major or minor chord, see the module docstring); its CSV path,
    "" for the images without a clip."""
    import soundfile as sf

    rng = np.random.default_rng([seed, index, 1])
    if rng.random() < AUDIO_MISSING_FRACTION:
        return ""
    root = CHORD_ROOTS_HZ[int(rng.integers(len(CHORD_ROOTS_HZ)))]
    t = np.arange(AUDIO_RATE) / AUDIO_RATE
    wave = np.zeros_like(t)
    for semitones in CHORDS[mood]:
        f = root * 2 ** (semitones / 12)
        for harmonic, gain in ((1, 1.0), (2, 0.5), (3, 0.25)):
            wave += gain * np.sin(2 * np.pi * f * harmonic * t + rng.uniform(0, 2 * np.pi))
    envelope = np.minimum(1.0, t / 0.02) * np.exp(-1.5 * t)  # 20 ms attack, gentle decay
    wave = 0.2 * wave * envelope + rng.normal(0.0, 0.005, t.shape)
    name = f"{index:06d}.wav"
    sf.write(os.path.join(audio_dir, name), wave.astype(np.float32), AUDIO_RATE, subtype="PCM_16")
    return f"audio/{name}"


def _make_one(index: int, p: SyntheticParams, images_dir: str) -> list[tuple[str, ...]]:
    """Render image ``index``, write its JPEG, return its caption rows."""
    rng = np.random.default_rng([p.seed, index])
    scene = sample_scene(rng)
    image = render(scene, p.image_size, rng)
    name = f"{index:06d}.jpg"
    image.save(os.path.join(images_dir, name), "JPEG", quality=JPEG_QUALITY)
    main_shape = scene["objects"][0]["shape"]
    if p.questions:
        return [
            (f"images/{name}", *write_question(scene, rng), main_shape, scene["mood"])
            for _ in range(p.captions_per_image)
        ]
    rows = []
    for _ in range(p.captions_per_image):
        sentiment = "positive" if rng.random() < 0.5 else "negative"
        caption = write_caption(scene, sentiment, rng)
        consistent = sentiment == scene["mood"]
        if rng.random() < p.label_noise:
            consistent = not consistent
        label = "consistent" if consistent else "inconsistent"
        if p.label != "consistency":  # the default's draws stay as they were: same bytes
            label = other_label(p.label, scene, sentiment, caption, consistent, rng)
        rows.append((f"images/{name}", caption, label, main_shape, scene["mood"], sentiment))
    return rows


def other_label(
    kind: str,
    scene: dict[str, Any],
    sentiment: str,
    caption: str,
    consistent: bool,
    rng: np.random.Generator,
) -> str:
    """The label of a caption for ``label`` = sentiment, score or tags (see the module docstring).

    ``consistent`` carries the label noise already drawn: a noisy sentiment label says "mixed"
    for an agreeing pair and the image's mood for a disagreeing one.
    """
    mood = scene["mood"]
    if kind == "sentiment":
        return mood if consistent else "mixed"
    if kind == "score":
        word = next(w for w in WORD_STRENGTH if w in caption.lower())
        mood_part = (0.9 if mood == "positive" else -0.9) * (0.3 if scene["ambiguous"] else 1.0)
        text_part = 0.9 * WORD_STRENGTH[word] * (1.0 if sentiment == "positive" else -1.0)
        value = 3.0 + mood_part + text_part + rng.normal(0.0, 0.25)
        return f"{min(5.0, max(1.0, value)):.2f}"
    shapes = sorted({obj["shape"] for obj in scene["objects"]})
    return LABEL_SEPARATOR.join(sorted([*shapes, sentiment]))


def write_question(scene: dict[str, Any], rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, answer, question type) about ``scene`` that only the image can answer."""
    objects = scene["objects"]
    unique = [o for o in objects if sum(p["shape"] == o["shape"] for p in objects) == 1]
    columns = [(a, b) for a in unique for b in unique
               if POSITIONS[a["position"]][0] < POSITIONS[b["position"]][0]]  # fmt: skip
    kind = int(rng.integers(3))
    if kind == 2 and columns:
        a, b = columns[int(rng.integers(len(columns)))]
        if rng.random() < 0.5:  # ask both ways round: the answer is yes or no
            return f"is the {a['shape']} left of the {b['shape']}?", "yes", "is left of"
        return f"is the {b['shape']} left of the {a['shape']}?", "no", "is left of"
    if kind == 1 or not unique:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        n = sum(o["shape"] == shape for o in objects)
        answer = COUNT_WORDS[n] if rng.random() < 0.5 else str(n)
        return f"how many {shape}s are there?", answer, "how many"
    obj = unique[int(rng.integers(len(unique)))]
    word = _pick(rng, ("colour", "colour", "color"))
    return f"what {word} is the {obj['shape']}?", obj["colour"], "what colour"


def sample_scene(rng: np.random.Generator) -> dict[str, Any]:
    """Draw the scene description: mood, palette, ambiguity, and 1-3 objects (main first)."""
    mood = "positive" if rng.random() < 0.5 else "negative"
    palette = WARM if mood == "positive" else COOL
    c1, c2 = rng.choice(len(palette), size=2, replace=False)
    n_objects = int(rng.integers(1, 4))
    positions = rng.choice(len(POSITION_NAMES), size=n_objects, replace=False)
    main_size = SIZES[int(rng.integers(2))]
    objects = []
    for i, pos in enumerate(positions):
        size = main_size if i == 0 or main_size == "small" else SIZES[int(rng.integers(2))]
        objects.append(
            {
                "shape": SHAPES[int(rng.integers(len(SHAPES)))],
                "colour": COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))],
                "size": size,
                "position": POSITION_NAMES[int(pos)],
                "scale": 1.0 if i == 0 else SECONDARY_SCALE,
                "jitter": tuple(rng.uniform(-0.03, 0.03, size=2)),
            }
        )
    return {
        "mood": mood,
        "colours": (palette[c1], palette[c2]),
        "angle": float(rng.uniform(0, 2 * np.pi)),
        "ambiguous": bool(rng.random() < AMBIGUOUS_FRACTION),
        "objects": objects,
    }


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in [-0.5, 0.5], (S, S) each; cached per size."""
    axis = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    return np.meshgrid(axis, axis)


def render(scene: dict[str, Any], size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the scene: noisy gradient background, then the objects, main one last."""
    c1, c2 = (np.asarray(c, dtype=np.float32) for c in scene["colours"])
    if scene["ambiguous"]:
        c1, c2 = 0.8 * GREY + 0.2 * c1, 0.8 * GREY + 0.2 * c2
    xs, ys = _grid(size)
    t = xs * np.cos(scene["angle"]) + ys * np.sin(scene["angle"])  # (S, S), in [-0.71, 0.71]
    t = ((t - t.min()) / max(float(np.ptp(t)), 1e-6))[..., None]  # (S, S, 1) in [0, 1]
    background = c1 * (1.0 - t) + c2 * t  # (S, S, 3)
    background += rng.integers(-8, 9, size=background.shape, dtype=np.int16)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in reversed(scene["objects"]):
        _draw_object(draw, obj, size)
    return image


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict[str, Any], size: int) -> None:
    fx, fy = POSITIONS[obj["position"]]
    cx, cy = (fx + obj["jitter"][0]) * size, (fy + obj["jitter"][1]) * size
    r = RADIUS[obj["size"]] * obj["scale"] * size
    fill = COLOURS[obj["colour"]]
    outline = (255, 255, 255) if sum(fill) < 300 else (0, 0, 0)
    width = max(1, size // 48)
    box = (cx - r, cy - r, cx + r, cy + r)
    shape = obj["shape"]
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        s = r * 0.85  # same visual weight as the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill, outline=outline, width=width)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a triangle, five-pointed star or cross centred on (cx, cy)."""
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
    if shape == "star":
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return [
            (cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles, strict=True)
        ]
    a = r * 0.35  # cross: half the arm width
    pts = [
        (-a, -r),
        (a, -r),
        (a, -a),
        (r, -a),
        (r, a),
        (a, a),
        (a, r),
        (-a, r),
        (-a, a),
        (-r, a),
        (-r, -a),
        (-a, -a),
    ]
    return [(cx + x, cy + y) for x, y in pts]


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def _noun_phrase(obj: dict[str, Any], rng: np.random.Generator, p_size: float, p_pos: float) -> str:
    """'a big crimson circle on the left' with the size and position each optional."""
    words = []
    if rng.random() < p_size:
        words.append(_pick(rng, SIZE_WORDS[obj["size"]]))
    words.append(_pick(rng, COLOUR_WORDS[obj["colour"]]))
    words.append(_pick(rng, SHAPE_WORDS[obj["shape"]]))
    phrase = _article(" ".join(words))
    if rng.random() < p_pos:
        phrase += " " + _pick(rng, POSITION_WORDS[obj["position"]])
    return phrase


def write_caption(scene: dict[str, Any], sentiment: str, rng: np.random.Generator) -> str:
    """One caption: the main object (+ maybe the others) in one of several templates."""
    main, *others = scene["objects"]
    np_ = _noun_phrase(main, rng, 0.6, 0.6)
    for obj in others:
        if rng.random() < 0.4:
            np_ += _pick(rng, LINKS) + _noun_phrase(obj, rng, 0.4, 0.4)
    s = _pick(rng, SENTIMENT_WORDS[sentiment])
    template = int(rng.integers(7))
    clause = template in (2, 3)  # templates that read well after a distractor lead
    text = (
        f"{np_}. It looks {s}.",
        f"{s} scene: {np_}.",
        f"this {s} image shows {np_}.",
        f"there is {np_}, and the mood is {s}.",
        f"what {_article(s)} picture: {np_}!",
        f"{_article(s)} view with {np_}.",
        f"{np_}, all very {s}.",
    )[template]
    if clause and rng.random() < 0.3:
        text = _pick(rng, LEADS) + text
    return text[0].upper() + text[1:]
