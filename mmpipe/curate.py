"""Stage `curate`: near-duplicate image groups, image-text agreement scores and basic filters.

Reads ingest's records.parquet + images.parquet and writes the same two tables, filtered, into
``out_dir`` (align reads them from there): images.parquet gains a ``group_id`` column, the id
align splits by, so near-copies of one photo never straddle train and test. Beside them:
rejects.jsonl (every removed image and pair, with a named reason, ``REJECT_REASONS``),
scores.parquet (with a scorer: the cosine similarity of each pair's image and caption
embeddings) and report.json (counts that add up: images in = kept + rejected, pairs in = kept +
rejected). With every filter off and no near-duplicate found, the two tables hold ingest's rows
in ingest's order, so align's outputs are byte-identical to align on ingest's.

Undecodable images: with every filter off curate decodes nothing. Hashing and scoring decode the
images; under ``ingest.image_check: header`` (the default) ingest did not, so an image that
cannot be decoded here is an image reject ``undecodable_image`` (its file and the decoder's error
named; its captions rejected as ``image_rejected``), as shard would reject it (ingest.strict:
the first one fails the stage). Under ``decode`` ingest decoded it, so it changed since ingest:
an InputError, as in shard. A missing file is an InputError in both modes.

Near-duplicates (``near_duplicates``): a 64-bit perceptual hash per image (the DCT hash of
imagehash's ``phash``: 32x32 grey, 2-D DCT-II, the 8x8 lowest frequencies against their median),
computed per chunk in worker processes (``mmpipe.parallel``; only the hashes, 8 bytes per image,
come back). Images within Hamming distance ``hash_radius`` are found by multi-index hashing
(Norouzi et al. 2012): the hash is cut into radius+1 bands, two hashes within the radius agree
exactly on at least one band (pigeonhole), so candidates are neighbours in a sort by one band,
verified by popcount; the pairs are joined into groups (connected components). A group's id is
its smallest member image_id: independent of record order and worker count, and a new image
moves an existing group to another split only when it joins that group with an id that sorts
first (or bridges two groups); an image in no group keeps its own image_id, so it never moves.

Scores (``scorer``): the model is resolved by the driver (``mmpipe.pipeline``: a checkpoint, a
models:/ URI, the champion or hf:<id or dir>) and handed in as a ``Predictor``; images are
embedded through its own preprocessing (``Predictor.embed_images``), captions through
``Predictor.embed_captions``, as ``mmpipe eval-retrieval`` does.

Memory: records and images are streamed in batches; only per-image arrays (keys, sizes, hash,
reject code, group) and per-record arrays (reject code, score) span the whole set; image
embeddings go to a memory-mapped scratch file.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from mmpipe.config import CurateParams, section_hash
from mmpipe.errors import InputError, ValidationFailed, check
from mmpipe.faults import fault_point
from mmpipe.io import (
    atomic_path,
    iter_batches,
    open_parquet,
    scratch_dir,
    use_compute_allocator,
    use_system_arrow_allocator,
    write_json_atomic,
)
from mmpipe.keys import KeyIndex, arrow_keys
from mmpipe.parallel import dask_map, ordered_map, process_pool
from mmpipe.shard import header_checked, missing_image

log = logging.getLogger(__name__)

BATCH = 4096
HASH_BITS = 64

# reject reason codes (docs/reject-reasons.md); kind "image" or "pair"
REJECT_REASONS = {
    "image_too_small": "image: its shorter side is below curate.min_image_side",
    "aspect_ratio": "image: long side / short side above curate.max_aspect_ratio",
    "near_duplicate": "image: a near-copy of the group's kept image (curate.keep_one_per_group)",
    "no_caption_kept": "image: every caption of it was rejected here",
    "semantic_duplicate": "image: within curate.semantic_threshold of another in its cluster",
    "undecodable_image": "image: hashing or scoring could not decode it (detail: the error)",
    "image_rejected": "pair: its image was rejected here (detail: the image's reason)",
    "caption_too_few_words": "pair: fewer words than curate.min_caption_words",
    "caption_too_short": "pair: fewer characters than curate.min_caption_chars",
    "language": "pair: the caption's detected language is not in curate.languages",
    "low_score": "pair: image-text score below curate.min_score",
    "below_top_fraction": "pair: not in the top curate.keep_fraction of its source by score",
}
_IMAGE_CODES = (
    "",
    "image_too_small",
    "aspect_ratio",
    "near_duplicate",
    "no_caption_kept",
    "semantic_duplicate",
    "undecodable_image",
)
_UNDECODABLE = _IMAGE_CODES.index("undecodable_image")
_PAIR_CODES = (
    "",
    "image_rejected",
    "caption_too_few_words",
    "caption_too_short",
    "language",
    "low_score",
    "below_top_fraction",
)


# ----------------------------------------------------------------------------- perceptual hash


def phash(image: Image.Image) -> int:
    """imagehash's ``phash`` (hash_size 8, highfreq_factor 4) as a 64-bit int."""
    from scipy.fft import dct

    image.draft("L", (64, 64))  # JPEG: decode at the smallest DCT scale still >= 64 px
    grey = image.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    low = dct(dct(pixels, axis=0), axis=1)[:8, :8]
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


_ROOT: dict[str, Path] = {}


def _init_hash(root: str) -> None:
    _ROOT["root"] = Path(root)


def hash_file(rel: str) -> int | str:
    """The phash of one image under the data root, or why it cannot be decoded (a str); a
    missing file is an InputError."""
    path = _ROOT["root"] / rel
    try:
        with Image.open(path) as im:
            return phash(im)
    except FileNotFoundError:
        raise missing_image(path) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"


def hash_images(rels: Iterator[str], root: Path, p: CurateParams) -> Iterator[int | str]:
    """The phash of each image, in input order, computed per chunk where ``p`` says."""
    if p.executor == "dask":
        on = dict(address=p.address, workers=p.workers, chunksize=64)
        yield from dask_map(hash_file, rels, **on, initializer=_init_hash, initargs=(str(root),))
    elif p.workers > 1:
        with process_pool(p.workers, initializer=_init_hash, initargs=(str(root),)) as pool:
            yield from ordered_map(pool, hash_file, rels, chunksize=64, depth=4 * p.workers)
    else:
        _init_hash(str(root))
        yield from map(hash_file, rels)


# ----------------------------------------------------------------------------- the band index


def bands(radius: int) -> list[tuple[int, int]]:
    """(shift, width) of the radius+1 bands the 64 bits are cut into."""
    n = radius + 1
    widths = [HASH_BITS // n + (1 if i < HASH_BITS % n else 0) for i in range(n)]
    shifts = np.cumsum([0, *widths[:-1]]).tolist()
    return list(zip(shifts, widths, strict=True))


def near_pairs(hashes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j or j < i, maybe repeated) of ``hashes`` within Hamming ``radius``.

    Multi-index hashing: a pair within the radius agrees on at least one of radius+1 bands, so
    it is adjacent within a run of equal band values in the sort by that band. Work grows with
    the size of those runs, not with N^2.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    found_a, found_b = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for shift, width in bands(radius):
        mask = np.uint64((1 << width) - 1)
        values = (hashes >> np.uint64(shift)) & mask
        order = np.argsort(values, kind="stable")
        ordered = values[order]
        d = 1
        while d < len(order):
            same = ordered[:-d] == ordered[d:]  # sorted: equal at distance d = one run
            if not same.any():
                break
            a, b = order[:-d][same], order[d:][same]
            close = np.bitwise_count(hashes[a] ^ hashes[b]) <= radius
            found_a.append(a[close])
            found_b.append(b[close])
            d += 1
    return np.concatenate(found_a), np.concatenate(found_b)


def hash_groups(hashes: np.ndarray, hashed: np.ndarray, radius: int) -> np.ndarray:
    """A component label per image (-1: in no group); images within ``radius`` share one."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows = np.flatnonzero(hashed)
    unique, inverse = np.unique(hashes[rows], return_inverse=True)  # exact copies: one node
    a, b = near_pairs(unique, radius)
    n = len(unique)
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    labels = component[inverse]
    sizes = np.bincount(labels, minlength=n)
    out = np.full(len(hashes), -1, dtype=np.int64)
    out[rows] = np.where(sizes[labels] > 1, labels, -1)
    return out


# ----------------------------------------------------------------------------- the images


class Images:
    """ingest's accepted images as per-image arrays: keys of their ids, sizes, reject codes,
    group labels; ids and paths re-read from the file when needed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pf = _parquet(path, ("image_id", "rel_path", "width", "height"))
        n = self.pf.metadata.num_rows
        keys = np.empty((n, 2), dtype=np.uint64)
        self.width = np.empty(n, dtype=np.int64)
        self.height = np.empty(n, dtype=np.int64)
        at = 0
        for batch in iter_batches(self.pf, BATCH, ["image_id", "width", "height"]):
            k = batch.num_rows
            keys[at : at + k] = arrow_keys(batch.column(0).cast(pa.string()))
            self.width[at : at + k] = pc.fill_null(batch.column(1), 0).to_numpy()
            self.height[at : at + k] = pc.fill_null(batch.column(2), 0).to_numpy()
            at += k
        self.index = KeyIndex.build(keys)
        self.code = np.zeros(n, dtype=np.int8)  # _IMAGE_CODES
        self.group = np.full(n, -1, dtype=np.int64)  # hash_groups' label
        self.has_records = np.zeros(n, dtype=bool)
        self.has_kept = np.zeros(n, dtype=bool)
        self.undecodable: dict[int, tuple[str, str]] = {}  # row: (rel_path, the error)

    def __len__(self) -> int:
        return len(self.code)

    def column(self, name: str) -> Iterator[Any]:
        for batch in iter_batches(self.pf, BATCH, [name]):
            yield from batch.column(0).to_pylist()

    def find(self, ids: pa.Array) -> np.ndarray:
        at = self.index.find(arrow_keys(ids))
        at[~ids.is_valid().to_numpy(zero_copy_only=False)] = -1
        return at


def _parquet(path: Path, columns: tuple[str, ...]) -> pq.ParquetFile:
    return open_parquet(path, columns, "ingest")


def mark_undecodable(
    images: Images, bad: dict[int, str], root: Path, policy: tuple[bool, bool]
) -> None:
    """Reject the images at the rows of ``bad`` ({row: the decoder's error}) as
    ``undecodable_image`` under ``policy`` (``shard.header_checked``); an image already rejected
    keeps its reason."""
    if not bad:
        return  # (``_take`` would read the whole rel_path column for nothing)
    rows = np.array(sorted(bad), dtype=np.int64)
    for row, rel in zip(rows.tolist(), _take(images.column("rel_path"), rows), strict=True):
        if images.code[row] != 0:
            continue
        reject, strict = policy
        if not reject:
            raise InputError(
                f"{root / rel}: unreadable image ({bad[row]}); ingest.image_check is decode, so "
                "it changed since ingest: re-run `mmpipe ingest`"
            )
        if strict:
            raise ValidationFailed(
                f"{rel}: undecodable_image ({bad[row]}); ingest.strict is true and "
                "ingest.image_check is header, so curate's decode is the check"
            )
        images.code[row] = _UNDECODABLE
        images.undecodable[row] = (rel, bad[row])


def filter_images(images: Images, p: CurateParams) -> None:
    """Set the size and aspect-ratio reject codes (from ingest's recorded sizes)."""
    short = np.minimum(images.width, images.height)
    long = np.maximum(images.width, images.height)
    if p.max_aspect_ratio is not None:
        ratio = long / np.maximum(short, 1)
        images.code[(images.code == 0) & (ratio > p.max_aspect_ratio)] = 2
    if p.min_image_side is not None:
        images.code[(images.code == 0) & (short < p.min_image_side)] = 1


def group_images(
    images: Images, root: Path, p: CurateParams, policy: tuple[bool, bool]
) -> tuple[dict[str, Any], float]:
    """Hash every image, group near-copies (an image that cannot be decoded: see
    ``mark_undecodable``); returns the report's ``near_duplicates`` and the seconds the hashing
    took."""
    started = time.perf_counter()
    hashes = np.zeros(len(images), dtype=np.uint64)
    hashed = np.zeros(len(images), dtype=bool)
    bad: dict[int, str] = {}
    for i, value in enumerate(hash_images(images.column("rel_path"), root, p)):
        if isinstance(value, str):
            bad[i] = value
        else:
            hashes[i], hashed[i] = np.uint64(value), True
    hash_seconds = time.perf_counter() - started
    mark_undecodable(images, bad, root, policy)
    images.group = hash_groups(hashes, hashed & (images.code == 0), p.hash_radius)
    grouped = images.group >= 0
    return {
        "hash_radius": p.hash_radius,
        "unhashable_images": int((~hashed).sum()),
        "groups": len(np.unique(images.group[grouped])),
        "images_in_groups": int(grouped.sum()),
        "largest_group": int(np.bincount(images.group[grouped]).max()) if grouped.any() else 0,
    }, hash_seconds


def group_ids(images: Images) -> dict[int, str]:
    """{group label: its id}: the smallest image_id of the group (see the module docstring)."""
    grouped = np.flatnonzero(images.group >= 0)
    if not len(grouped):
        return {}
    ids = pa.array(list(_take(images.column("image_id"), grouped)), pa.string())
    table = (
        pa.table({"g": images.group[grouped], "id": ids}).group_by("g").aggregate([("id", "min")])
    )
    return dict(zip(table["g"].to_pylist(), table["id_min"].to_pylist(), strict=True))


def _take(values: Iterator[Any], rows: np.ndarray) -> Iterator[Any]:
    wanted = iter(rows.tolist())
    nxt = next(wanted, None)
    for i, value in enumerate(values):
        if i == nxt:
            yield value
            nxt = next(wanted, None)


def keep_one_per_group(images: Images) -> dict[int, str]:
    """Reject all but the largest image (most pixels, then the smallest image_id) of each
    group; returns {group label: the kept image's id}."""
    grouped = np.flatnonzero((images.group >= 0) & (images.code == 0))
    pixels = images.width[grouped] * images.height[grouped]
    ids = list(_take(images.column("image_id"), grouped))
    best: dict[int, tuple[int, str, int]] = {}
    for row, px, image_id in zip(grouped.tolist(), pixels.tolist(), ids, strict=True):
        g = int(images.group[row])
        key = (-px, image_id, row)
        if g not in best or key < best[g]:
            best[g] = key
    for row in grouped.tolist():
        if best[int(images.group[row])][2] != row:
            images.code[row] = 3
    return {g: key[1] for g, key in best.items()}


# ----------------------------------------------------------------------------- the captions


def _words(captions: list[str]) -> np.ndarray:
    return np.array([len(c.split()) for c in captions], dtype=np.int64)


def _language(captions: list[str]) -> list[str]:
    import py3langid

    return [py3langid.classify(c)[0] for c in captions]


def caption_codes(captions: list[str], p: CurateParams) -> tuple[np.ndarray, list[str | None]]:
    """A pair reject code per caption (0 = kept) and its detail (the detected language)."""
    code = np.zeros(len(captions), dtype=np.int8)
    detail: list[str | None] = [None] * len(captions)
    if p.min_caption_words is not None:
        code[(code == 0) & (_words(captions) < p.min_caption_words)] = 2
    if p.min_caption_chars is not None:
        chars = np.array([len(c.strip()) for c in captions], dtype=np.int64)
        code[(code == 0) & (chars < p.min_caption_chars)] = 3
    if p.languages is not None:
        wanted = set(p.languages)
        todo = np.flatnonzero(code == 0)
        found = _language([captions[i] for i in todo])
        for i, lang in zip(todo.tolist(), found, strict=True):
            if lang not in wanted:
                code[i], detail[i] = 4, lang
    return code, detail


# ----------------------------------------------------------------------------- scores


def embed_images(
    predictor: Any,
    images: Images,
    root: Path,
    rows: np.ndarray,
    dest: Path,
    batch: int,
    policy: tuple[bool, bool] = (False, False),
) -> np.memmap:
    """L2-normalised embeddings of the images at ``rows`` into a memory map (N, D) at ``dest``
    (rows not embedded stay 0); an image that cannot be decoded: see ``mark_undecodable``."""
    paths = _take(images.column("rel_path"), rows)
    emb: np.memmap | None = None
    bad: dict[int, str] = {}
    for start in range(0, len(rows), batch):
        chunk = [str(root / rel) for rel in islice(paths, batch)]
        x, failed = _embed_chunk(predictor, chunk, batch)
        chunk_rows = rows[start : start + len(chunk)]
        bad.update({int(chunk_rows[i]): error for i, error in failed.items()})
        if emb is None and x is not None:
            emb = np.lib.format.open_memmap(dest, "w+", np.float32, (len(images), x.shape[1]))
        if x is not None:
            emb[np.delete(chunk_rows, sorted(failed))] = x
    if emb is None:
        emb = np.lib.format.open_memmap(dest, "w+", np.float32, (len(images), 1))
    mark_undecodable(images, bad, root, policy)
    return emb


def _embed_chunk(
    predictor: Any, paths: list[str], batch: int
) -> tuple[np.ndarray | None, dict[int, str]]:
    """Normalised embeddings of the decodable ``paths`` (None: none is) and {index: error} of
    the others. The whole chunk first; one by one only when it holds an unreadable image."""
    try:
        return _normalise(predictor.embed_images(paths, batch_size=batch).numpy()), {}
    except InputError:
        pass
    out, failed = [], {}
    for i, path in enumerate(paths):
        try:
            out.append(predictor.embed_images([path], batch_size=1).numpy())
        except InputError as exc:
            if not Path(path).is_file():
                raise missing_image(path) from None
            failed[i] = str(exc).removeprefix(f"{path}: ")
    return (_normalise(np.concatenate(out)) if out else None), failed


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def semantic_dedup(emb: np.ndarray, images: Images, p: CurateParams) -> dict[str, Any]:
    """SemDeDup (Abbas et al. 2023) on the kept images' embeddings: k-means, then in each
    cluster, ordered by distance to the centroid (farthest first), an image more similar than
    ``semantic_threshold`` to an earlier one is rejected. Returns the report's counts."""
    from sklearn.cluster import KMeans

    rows = np.flatnonzero(images.code == 0)
    k = min(len(rows), p.semantic_clusters or max(1, round(math.sqrt(len(rows)))))
    if len(rows) < 2:
        return {
            "clusters": 0,
            "threshold": p.semantic_threshold,
            "removed": 0,
            "removed_per_cluster": {},
        }
    x = np.asarray(emb[rows], dtype=np.float32)
    km = KMeans(n_clusters=k, n_init=1, random_state=0).fit(x)
    removed: dict[str, int] = {}
    for c in range(k):
        members = np.flatnonzero(km.labels_ == c)
        if len(members) < 2:
            continue
        centre = _normalise(km.cluster_centers_[c : c + 1])[0]
        order = members[np.argsort(x[members] @ centre, kind="stable")]  # farthest first
        sims = np.triu(x[order] @ x[order].T, k=1)  # (m, m): each with the ones before it
        drop = order[sims.max(axis=0) > p.semantic_threshold]
        images.code[rows[drop]] = 5
        if len(drop):
            removed[str(c)] = len(drop)
    return {
        "clusters": k,
        "threshold": p.semantic_threshold,
        "removed": sum(removed.values()),
        "removed_per_cluster": removed,
    }


def pair_scores(
    predictor: Any, captions: list[str], image_emb: np.ndarray, batch: int
) -> np.ndarray:
    """Cosine similarity of each caption with its image's embedding (rows of ``image_emb``)."""
    text = _normalise(predictor.embed_captions(captions, batch_size=max(batch, 256)).numpy())
    return np.einsum("nd,nd->n", text, image_emb).astype(np.float32)


def top_fraction(
    scores: np.ndarray, sources: np.ndarray, eligible: np.ndarray, fraction: float
) -> np.ndarray:
    """A mask of the eligible pairs NOT in the top ``fraction`` (by score, ties by record order)
    of their source: ceil(fraction * n) are kept per source."""
    drop = np.zeros(len(scores), dtype=bool)
    for source in np.unique(sources[eligible]):
        rows = np.flatnonzero(eligible & (sources == source))
        order = rows[np.argsort(-scores[rows], kind="stable")]
        drop[order[math.ceil(fraction * len(rows)) :]] = True
    return drop


# ----------------------------------------------------------------------------- the stage


class Rejects:
    """rejects.jsonl and its counts per (kind, reason)."""

    def __init__(self, fh: IO[str]) -> None:
        self.fh = fh
        self.counts: Counter[tuple[str, str]] = Counter()

    def add(
        self,
        kind: str,
        id_: str,
        image_id: str,
        reason: str,
        detail: Any = None,
        score: float | None = None,
        file: str | None = None,
    ) -> None:
        check(reason in REJECT_REASONS, f"undocumented reject reason {reason!r}")
        row = {"kind": kind, "id": id_, "image_id": image_id, "reason": reason, "detail": detail}
        if score is not None:
            row["score"] = round(float(score), 6)
        if file is not None:
            row["file"] = file
        self.fh.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
        self.counts[(kind, reason)] += 1

    def by_reason(self, kind: str) -> dict[str, int]:
        return dict(sorted((r, n) for (k, r), n in self.counts.items() if k == kind))


def _records_pass(
    records: pq.ParquetFile, images: Images, p: CurateParams, scoring: tuple[Any, np.ndarray] | None
) -> dict[str, Any]:
    """Per-record arrays: reject code, detail (language), score, source (for keep_fraction)."""
    n = records.metadata.num_rows
    code = np.zeros(n, dtype=np.int8)
    score = np.full(n, np.nan, dtype=np.float32)
    row_of = np.full(n, -1, dtype=np.int64)
    details: dict[int, str] = {}
    source = np.zeros(n, dtype=np.int32)  # keep_fraction's groups: a code per source name
    source_codes: dict[str | None, int] = {}
    at = 0
    for batch in iter_batches(records, BATCH, ["image_id", "caption", "source"]):
        k = batch.num_rows
        rows = images.find(batch.column(0).cast(pa.string()))
        row_of[at : at + k] = rows
        known = rows >= 0
        images.has_records[rows[known]] = True
        c = np.zeros(k, dtype=np.int8)
        c[known & (images.code[np.maximum(rows, 0)] != 0)] = 1
        captions = [x or "" for x in batch.column(1).cast(pa.string()).to_pylist()]
        cap_code, cap_detail = caption_codes(captions, p)
        open_ = c == 0
        c[open_] = cap_code[open_]
        for i in np.flatnonzero(open_ & (cap_code == 4)).tolist():
            details[at + i] = cap_detail[i]
        if scoring is not None:
            todo = np.flatnonzero((c == 0) & known)
            if len(todo):
                predictor, emb = scoring
                s = pair_scores(
                    predictor, [captions[i] for i in todo], emb[rows[todo]], p.batch_size
                )
                score[at + todo] = s
        code[at : at + k] = c
        if p.keep_fraction is not None:
            names = batch.column(2).cast(pa.string()).to_pylist()
            codes = [source_codes.setdefault(x, len(source_codes)) for x in names]
            source[at : at + k] = codes
        at += k
    if scoring is not None and p.min_score is not None:
        code[(code == 0) & (score < p.min_score)] = 5
    if scoring is not None and p.keep_fraction is not None:
        code[top_fraction(score, source, (code == 0) & ~np.isnan(score), p.keep_fraction)] = 6
    kept_rows = row_of[(code == 0) & (row_of >= 0)]
    images.has_kept[kept_rows] = True
    return {"code": code, "score": score, "row_of": row_of, "details": details}


def _write_records(
    records: pq.ParquetFile, images: Images, arrays: dict[str, Any], out_dir: Path, rejects: Rejects
) -> int:
    """records.parquet (kept rows, ingest's schema and metadata) + pair rejects; kept count."""
    code, score, row_of = arrays["code"], arrays["score"], arrays["row_of"]
    kept, at = 0, 0
    image_reasons = np.array(_IMAGE_CODES, dtype=object)
    with (
        atomic_path(out_dir / "records.parquet") as tmp,
        pq.ParquetWriter(tmp, records.schema_arrow) as writer,
    ):
        for batch in iter_batches(records, BATCH):
            k = batch.num_rows
            c = code[at : at + k]
            table = pa.Table.from_batches([batch])
            writer.write_table(table.filter(pa.array(c == 0)))
            kept += int((c == 0).sum())
            bad = np.flatnonzero(c != 0)
            if len(bad):
                ids = table["caption_id"].cast(pa.string()).to_pylist()
                img = table["image_id"].cast(pa.string()).to_pylist()
                for i in bad.tolist():
                    reason, s, detail = _PAIR_CODES[c[i]], score[at + i], None
                    if reason == "image_rejected":
                        detail = image_reasons[images.code[row_of[at + i]]]
                    elif reason == "language":
                        detail = arrays["details"].get(at + i)
                    kept_score = None if np.isnan(s) else float(s)
                    rejects.add("pair", ids[i], img[i], reason, detail, kept_score)
            at += k
    return kept


def _write_images(
    images: Images,
    gid_of_row: dict[int, str],
    keep_of: dict[int, str],
    out_dir: Path,
    rejects: Rejects,
) -> int:
    """images.parquet (kept rows + group_id) + image rejects; the kept count."""
    # an image that had captions and lost every one here leaves with them (align would count it
    # as an orphan without a caption, which it was not)
    images.code[(images.code == 0) & images.has_records & ~images.has_kept] = 4
    schema = images.pf.schema_arrow.append(pa.field("group_id", pa.string()))
    kept, at = 0, 0
    with (
        atomic_path(out_dir / "images.parquet") as tmp,
        pq.ParquetWriter(tmp, schema) as writer,
    ):
        for batch in iter_batches(images.pf, BATCH):
            k = batch.num_rows
            table = pa.Table.from_batches([batch])
            ids = table["image_id"].cast(pa.string()).to_pylist()
            gids = [gid_of_row.get(at + i, ids[i]) for i in range(k)]
            table = table.append_column("group_id", pa.array(gids, pa.string()))
            c = images.code[at : at + k]
            writer.write_table(table.filter(pa.array(c == 0)))
            kept += int((c == 0).sum())
            for i in np.flatnonzero(c != 0).tolist():
                reason = _IMAGE_CODES[c[i]]
                detail: Any = None
                file = None
                if reason == "undecodable_image":
                    file, detail = images.undecodable[at + i]
                elif reason == "near_duplicate":
                    detail = f"group {gids[i]}; kept {keep_of[int(images.group[at + i])]}"
                elif reason in ("image_too_small", "aspect_ratio"):
                    detail = f"{int(images.width[at + i])}x{int(images.height[at + i])}"
                rejects.add("image", ids[i], ids[i], reason, detail, file=file)
            at += k
    return kept


def _write_scores(records: pq.ParquetFile, score: np.ndarray, dest: Path) -> None:
    """scores.parquet: caption_id, image_id, score (null = not scored) of every pair in."""
    at = 0
    schema = pa.schema(
        [("caption_id", pa.string()), ("image_id", pa.string()), ("score", pa.float32())]
    )
    with atomic_path(dest) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for batch in iter_batches(records, BATCH, ["caption_id", "image_id"]):
            k = batch.num_rows
            s = score[at : at + k]
            writer.write_table(
                pa.table(
                    {
                        "caption_id": batch.column(0).cast(pa.string()),
                        "image_id": batch.column(1).cast(pa.string()),
                        "score": pa.array(s, pa.float32(), mask=np.isnan(s)),
                    },
                    schema=schema,
                )
            )
            at += k


def run_curate(
    ingest_dir: Path,
    p: CurateParams,
    out_dir: Path,
    *,
    data_root: Path,
    scorer: Any = None,
    scorer_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write records.parquet, images.parquet, rejects.jsonl, (scores.parquet) and report.json
    (last) into ``out_dir``; return the report (plus ``seconds``).

    ``scorer``: a ``Predictor`` (or None: nothing scored); ``scorer_info``: what it is, for the
    report (the driver resolves it: ``mmpipe.pipeline``).
    """
    started = time.perf_counter()
    ingest_dir, out_dir = Path(ingest_dir), Path(out_dir)
    use_system_arrow_allocator()
    records = _parquet(ingest_dir / "records.parquet", ("caption_id", "image_id", "caption"))
    images = Images(ingest_dir / "images.parquet")
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = header_checked(ingest_dir)
    filter_images(images, p)
    near, hash_seconds = (
        group_images(images, data_root, p, policy) if p.near_duplicates else (None, 0.0)
    )
    gid = group_ids(images) if near else {}
    keep_of = keep_one_per_group(images) if near and p.keep_one_per_group else {}
    gid_of_row = {r: gid[int(g)] for r, g in enumerate(images.group.tolist()) if g >= 0}
    with (
        atomic_path(out_dir / "rejects.jsonl") as rejects_path,
        rejects_path.open("w", encoding="utf-8") as fh,
        scratch_dir(out_dir / ".work") as work,
    ):
        rejects = Rejects(fh)
        scoring, semantic = None, None
        if scorer is not None:
            use_compute_allocator()  # the scorer's forward passes (then the records pass too)
            wanted = np.flatnonzero(images.code == 0)
            emb = embed_images(
                scorer, images, data_root, wanted, work / "images.npy", p.batch_size, policy
            )
            scoring = (scorer, emb)
            if p.semantic_dedup:
                semantic = semantic_dedup(emb, images, p)
        arrays = _records_pass(records, images, p, scoring)
        kept_pairs = _write_records(records, images, arrays, out_dir, rejects)
        kept_images = _write_images(images, gid_of_row, keep_of, out_dir, rejects)
        if scorer is not None:
            _write_scores(records, arrays["score"], out_dir / "scores.parquet")
    fault_point("curate:written")
    report = make_report(
        records, images, kept_pairs, kept_images, rejects, p, near, arrays["score"], scorer_info
    )
    report["semantic_dedup"] = semantic
    write_json_atomic(out_dir / "report.json", report)
    seconds = time.perf_counter() - started
    log.info(
        "curate: %d/%d pairs and %d/%d images kept, %s near-duplicate groups in %.1fs",
        kept_pairs,
        report["pairs"]["in"],
        kept_images,
        report["images"]["in"],
        near["groups"] if near else "no",
        seconds,
    )
    return {**report, "seconds": round(seconds, 3), "hash_seconds": round(hash_seconds, 3)}


def make_report(
    records: pq.ParquetFile,
    images: Images,
    kept_pairs: int,
    kept_images: int,
    rejects: Rejects,
    p: CurateParams,
    near: dict[str, Any] | None,
    score: np.ndarray,
    scorer_info: dict[str, Any] | None,
) -> dict[str, Any]:
    """The curate report, with its accounting identities asserted."""
    n_pairs = records.metadata.num_rows
    scored = score[~np.isnan(score)]
    report: dict[str, Any] = {
        "pairs": {
            "in": n_pairs,
            "kept": kept_pairs,
            "rejected": n_pairs - kept_pairs,
            "by_reason": rejects.by_reason("pair"),
        },
        "images": {
            "in": len(images),
            "kept": kept_images,
            "rejected": len(images) - kept_images,
            "by_reason": rejects.by_reason("image"),
        },
        "near_duplicates": near,
        "scorer": scorer_info,
        "scores": None
        if not len(scored)
        else {
            "scored_pairs": len(scored),
            "mean": round(float(scored.mean()), 6),
            "quantiles": {
                q: round(float(np.quantile(scored, float(q))), 6)
                for q in ("0.1", "0.25", "0.5", "0.75", "0.9")
            },
        },
        "params_hash": section_hash(p),
    }
    for kind in ("pairs", "images"):
        c = report[kind]
        ok = c["in"] == c["kept"] + c["rejected"] == c["kept"] + sum(c["by_reason"].values())
        check(ok, f"curate {kind}: in != kept + rejected: {c}")
    return report
