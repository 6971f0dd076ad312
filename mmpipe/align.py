"""Stage `align`: pair accepted images with their captions, account for orphans, split by image.

One image has many captions; a split is decided per image_id (hash of seed + image_id), so all
captions of an image, and byte-identical duplicate images (ingest gives them the kept copy's
image_id), always land in the same split, and adding data never moves existing images.

Out of core: records.parquet is read in batches and joined to the accepted images by a binary
search of their ids' keys (mmpipe.keys), the pairs go to bucket files by (split, leading hex
digits of image_id), and each bucket is sorted on its own (at most ``BUCKET_ROWS`` rows in
memory) and appended to pairs.parquet. The result is sorted by (split, image_id, pair_id): the
pairs of one image are consecutive, and shard, which writes one sample per image with all its
captions (docs/data-format.md), streams it in that order. Only per-image arrays (16-byte keys of the ids,
the paths in Arrow, a split code and a used flag per image) span the whole set. Labels are
optional: an unlabelled collection has no classes and label_index -1 everywhere; the report
counts labelled pairs per split and class.
"""

from __future__ import annotations

import hashlib
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

from mmpipe.config import AlignParams, section_hash
from mmpipe.errors import InputError, check
from mmpipe.faults import fault_point
from mmpipe.io import (
    LABEL_SEPARATOR_KEY,
    atomic_path,
    iter_batches,
    open_parquet,
    read_json,
    release_arrow_memory,
    scratch_dir,
    table_schema,
    use_system_arrow_allocator,
    write_json_atomic,
)
from mmpipe.keys import KeyIndex, arrow_keys, string_keys
from mmpipe.layout import SPLITS

log = logging.getLogger(__name__)

RECORD_COLUMNS = ("caption_id", "caption", "image_id", "label", "source", "meta")
IMAGE_COLUMNS = ("image_id", "rel_path")
GROUP_COLUMN = "group_id"  # curate's near-duplicate group of an image (its image_id: no group)
PAIR_SCHEMA = table_schema(
    "pair_id", "image_id", "caption_id", "caption", "label", ("label_index", pa.int64()), "split",
    "image_path",  # relative to the data root (ingest report's data_root)
    "source", "meta",
    ("label_indices", pa.list_(pa.int64())),  # every class of the label (multi-hot), known ones
)  # fmt: skip
PAIR_COLUMNS = tuple(PAIR_SCHEMA.names)
# with ingest.audio_column: the clip of each pair (relative to the data root; null = no audio)
AUDIO_PATH = pa.field("audio_path", pa.string())
BATCH = 4096  # records per read batch: small and fixed, so memory per step does not grow with N
BUCKET_ROWS = 65536  # at most this many pairs are sorted in memory at once
PAIRS_ROW_GROUP = 4096  # shard reads pairs.parquet a row group at a time

# orphan reason codes (orphans.jsonl, report.orphan_captions_by_reason)
NO_CAPTION = "no_caption"
IMAGE_UNKNOWN = "image_not_accepted"  # a record whose image_id is not among the accepted images


def split_of(image_id: str, p: AlignParams) -> str:
    """The split of one image group: u = sha256(f"{seed}:{image_id}")[:15] / 16**15."""
    u = int(hashlib.sha256(f"{p.seed}:{image_id}".encode()).hexdigest()[:15], 16) / 16**15
    if u < p.train:
        return "train"
    return "val" if u < p.train + p.val else "test"


def _parquet(path: Path, columns: tuple[str, ...]) -> pq.ParquetFile:
    """Open a curate parquet (align's input), checking it exists and has the columns align reads."""
    return open_parquet(path, columns, "curate")


class ImageTable:
    """The accepted images as compact arrays: keys of their ids, paths (Arrow), split codes and
    used flags; about 55 bytes per image. The ids themselves are re-read for the orphan list."""

    def __init__(self, path: Path, p: AlignParams) -> None:
        self.path = path
        pf = _parquet(path, IMAGE_COLUMNS)
        n = pf.metadata.num_rows
        keys = np.empty((n, 2), dtype=np.uint64)
        self.split = np.empty(n, dtype=np.int8)
        # curate's near-duplicate groups: the split is the group's (a group_id column), and the
        # split each image would get on its own, to count what the grouping prevented
        grouped = GROUP_COLUMN in pf.schema_arrow.names
        self.alone = np.empty(n, dtype=np.int8) if grouped else self.split
        self.group_keys = np.empty((n, 2), dtype=np.uint64) if grouped else None
        columns = [*IMAGE_COLUMNS, GROUP_COLUMN] if grouped else list(IMAGE_COLUMNS)
        paths, offset = [], 0
        for batch in iter_batches(pf, BATCH, columns):
            ids = batch.column("image_id").cast(pa.string()).to_pylist()
            at = slice(offset, offset + len(ids))
            keys[at] = string_keys(ids)
            groups = batch.column(GROUP_COLUMN).to_pylist() if grouped else ids
            self.split[at] = [
                SPLITS.index(split_of(g or i, p)) for g, i in zip(groups, ids, strict=True)
            ]
            if self.group_keys is not None:
                self.group_keys[at] = string_keys(
                    [g or i for g, i in zip(groups, ids, strict=True)]
                )
                self.alone[at] = [SPLITS.index(split_of(i, p)) for i in ids]
            paths.append(batch.column("rel_path").cast(pa.string()))
            offset += len(ids)
        self.paths = pa.chunked_array(paths, pa.string())  # no concatenated copy
        del paths
        self.index = KeyIndex.build(keys)
        del keys
        repeated = self.index.repeated()
        if len(repeated):
            dup = next(islice(_column(pf, "image_id"), int(repeated[0]), None))
            raise InputError(f"{path}: duplicate image_id {dup!r}")
        self.used = np.zeros(n, dtype=bool)

    def __len__(self) -> int:
        return len(self.used)

    def drop_lookups(self) -> None:
        """Free the keys and paths once every record is joined (before the sort's peak)."""
        self.paths = pa.chunked_array([], pa.string())
        self.index = KeyIndex.build(np.zeros((0, 2), dtype=np.uint64))

    def find(self, ids: pa.Array) -> np.ndarray:
        """The row of each id (int64), -1 for a null or unknown id."""
        at = self.index.find(arrow_keys(ids))
        at[~ids.is_valid().to_numpy(zero_copy_only=False)] = -1
        return at

    def rows(self) -> Iterator[tuple[str, str]]:
        """(image_id, rel_path) of every image, in file order (re-read: not held)."""
        pf = _parquet(self.path, IMAGE_COLUMNS)
        return zip(_column(pf, "image_id"), _column(pf, "rel_path"), strict=True)


def _column(pf: pq.ParquetFile, name: str) -> Iterator[Any]:
    """The values of one column as Python objects, a batch at a time."""
    for batch in iter_batches(pf, BATCH, [name]):
        yield from batch.column(0).to_pylist()


def _bucket_digits(n_records: int) -> int:
    """Leading hex digits of image_id per bucket, so a bucket holds about BUCKET_ROWS pairs."""
    if n_records <= BUCKET_ROWS:
        return 0
    return math.ceil(math.log(n_records / BUCKET_ROWS, 16))


class Buckets:
    """Pairs spread over Arrow IPC files by (split, image_id prefix), then read back sorted: all
    pairs of an image are in one bucket."""

    def __init__(self, work: Path, digits: int, schema: pa.Schema = PAIR_SCHEMA) -> None:
        self.work, self.digits, self.schema = work, digits, schema
        self.writers: dict[tuple[int, str], pa.ipc.RecordBatchFileWriter] = {}

    def add(self, table: pa.Table) -> None:
        """Append pairs (a table with PAIR_SCHEMA plus an int8 `_split` column)."""
        prefix = pc.utf8_slice_codeunits(table["image_id"], 0, self.digits)
        keys = pa.table({"s": table["_split"], "p": prefix}).group_by(["s", "p"]).aggregate([])
        for s, pre in zip(keys["s"].to_pylist(), keys["p"].to_pylist(), strict=True):
            mask = pc.and_(pc.equal(table["_split"], s), pc.equal(prefix, pre))
            part = table.filter(mask).drop_columns(["_split"])
            key = (s, pre)
            if key not in self.writers:
                sink = pa.OSFile(str(self.work / f"{s}-{pre or 'all'}.arrow"), "wb")
                self.writers[key] = pa.ipc.new_file(sink, self.schema)
            self.writers[key].write_table(part)

    def sorted_tables(self) -> Any:
        """Each bucket sorted by (image_id, pair_id), in (split, prefix) order: pairs.parquet's
        order, (split, image_id, pair_id)."""
        for writer in self.writers.values():
            writer.close()
        for key in sorted(self.writers):
            path = self.work / f"{key[0]}-{key[1] or 'all'}.arrow"
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_file(source).read_all()
            yield table.sort_by([("image_id", "ascending"), ("pair_id", "ascending")])
            del table
            path.unlink()


def _pairs_of_batch(batch: pa.RecordBatch, images: ImageTable) -> tuple[pa.Table, pa.Table]:
    """(pairs with a `_split` column, orphan records) of one records batch."""
    at = images.find(batch.column("image_id").cast(pa.string()))
    found = pa.array(at >= 0)
    orphans = pa.Table.from_batches([batch]).filter(pc.invert(found))
    kept = pa.Table.from_batches([batch]).filter(found)
    idx = at[at >= 0]
    images.used[idx] = True
    cid = kept["caption_id"].cast(pa.string())
    split = images.split[idx]
    pairs = pa.table(
        {
            "pair_id": cid,
            "image_id": kept["image_id"].cast(pa.string()),
            "caption_id": cid,
            "caption": kept["caption"].cast(pa.string()),
            "label": kept["label"].cast(pa.string()),
            "label_index": pa.array(np.full(len(idx), -1, dtype=np.int64)),
            "split": pa.array(np.array(SPLITS, dtype=object)[split], pa.string()),
            "image_path": images.paths.take(pa.array(idx)),
            "source": kept["source"].cast(pa.string()),
            "meta": pc.fill_null(kept["meta"].cast(pa.string()), "{}"),
            "label_indices": pa.nulls(len(idx), pa.list_(pa.int64())),  # set by _write_pairs
            **({"audio_path": kept["audio_path"]} if "audio_path" in kept.column_names else {}),
            "_split": pa.array(split, pa.int8()),
        }
    )
    return pairs, orphans


class Tally:
    """Counts for the report: pairs per split, labelled pairs per split and per class.

    With a label separator (multi-labels) a pair counts once for each of its classes.
    """

    def __init__(self, separator: str | None = None) -> None:
        self.separator = separator
        self.pairs = Counter[str]()
        self.labelled = Counter[str]()
        self.per_class = Counter[str]()
        self.train_per_class = Counter[str]()  # what top_k_labels ranks
        self.multi_label = 0
        self.orphan_captions = Counter[str]()
        self.records = 0

    def add(self, pairs: pa.Table) -> None:
        for split, n in zip(*_value_counts(pairs["split"]), strict=True):
            self.pairs[split] += n
        labelled = pairs.filter(pc.is_valid(pairs["label"]))
        for split, n in zip(*_value_counts(labelled["split"]), strict=True):
            self.labelled[split] += n
        parts = split_labels(labelled["label"], self.separator)
        self.multi_label += int(pc.sum(pc.greater(pc.list_value_length(parts), 1)).as_py() or 0)
        for label, n in zip(*_value_counts(pc.list_flatten(parts)), strict=True):
            self.per_class[label] += n
        in_train = pc.equal(labelled["split"], "train")
        for label, n in zip(*_value_counts(pc.list_flatten(parts.filter(in_train))), strict=True):
            self.train_per_class[label] += n

    def classes(self, top_k: int | None) -> list[str]:
        """The class list: every label, or the top_k most frequent in train (ties by name)."""
        if top_k is None:
            return sorted(self.per_class)
        ranked = sorted(self.train_per_class.items(), key=lambda kv: (-kv[1], kv[0]))
        return sorted(label for label, _ in ranked[:top_k])


def split_labels(labels: pa.Array | pa.ChunkedArray, separator: str | None) -> pa.ListArray:
    """Each label as the list of its classes (a null label: a null list).

    Without a separator every label is one class: split on NUL, which ingest never lets into a
    label (control characters are rejected).
    """
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks() if labels.num_chunks else pa.array([], pa.string())
    return pc.split_pattern(labels, separator or "\x00")


def label_indices(
    labels: pa.Array | pa.ChunkedArray, classes: pa.Array, separator: str | None
) -> tuple[pa.ListArray, np.ndarray]:
    """(known class indices per row, label_index per row) of a column of labels.

    label_index is the class of a one-class label and -1 otherwise: no label, several classes,
    or a class outside ``classes`` (``<unk>`` with top_k_labels).
    """
    parts = split_labels(labels, separator)
    lengths = pc.fill_null(pc.list_value_length(parts), 0).to_numpy(zero_copy_only=False)
    flat = pc.index_in(pc.list_flatten(parts), value_set=classes)
    idx = pc.fill_null(flat, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    known = idx >= 0
    rows = np.repeat(np.arange(len(lengths)), lengths)
    kept = np.bincount(rows[known], minlength=len(lengths))
    offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(idx[known], pa.int64()))
    single = np.full(len(lengths), -1, dtype=np.int64)
    one = (lengths == 1) & (kept == 1)
    single[one] = idx[np.concatenate([[0], np.cumsum(lengths)])[:-1][one]]
    return lists, single


def _value_counts(column: pa.ChunkedArray) -> tuple[list[Any], list[int]]:
    vc = pc.value_counts(column)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


def _write_orphan_captions(fh: IO[str], orphans: pa.Table, tally: Tally) -> None:
    for row in orphans.select(["caption_id", "image_id"]).to_pylist():
        orphan = {"kind": "caption", "id": row["caption_id"], "ref": row["image_id"]}
        fh.write(json.dumps({**orphan, "reason": IMAGE_UNKNOWN}, sort_keys=True) + "\n")
        tally.orphan_captions[IMAGE_UNKNOWN] += 1


def _write_orphan_images(fh: IO[str], images: ImageTable) -> int:
    if images.used.all():
        return 0
    for used, (image_id, rel_path) in zip(images.used.tolist(), images.rows(), strict=True):
        if not used:
            orphan = {"kind": "image", "id": image_id, "ref": rel_path}
            fh.write(json.dumps({**orphan, "reason": NO_CAPTION}, sort_keys=True) + "\n")
    return int((~images.used).sum())


def _write_pairs(
    buckets: Buckets, classes: list[str], dest: Path, where: Path, separator: str | None
) -> Counter[str]:
    """Sorted buckets -> pairs.parquet, with the label indices and a unique-pair_id check.

    Returns the labelled pairs per split with no known class (``<unk>`` under top_k_labels).
    """
    value_set = pa.array(classes, pa.string())
    unknown = Counter[str]()
    with atomic_path(dest) as tmp, pq.ParquetWriter(tmp, buckets.schema) as writer:
        for table in buckets.sorted_tables():
            _check_unique(table["pair_id"], where)
            lists, single = label_indices(table["label"], value_set, separator)
            for name, column in (("label_index", pa.array(single)), ("label_indices", lists)):
                table = table.set_column(table.schema.get_field_index(name), name, column)
            none = pc.and_(pc.is_valid(table["label"]), pc.equal(pc.list_value_length(lists), 0))
            for split, n in zip(*_value_counts(table["split"].filter(none)), strict=True):
                unknown[split] += n
            writer.write_table(table, row_group_size=PAIRS_ROW_GROUP)
    return unknown


def _check_unique(ids: pa.ChunkedArray, where: Path) -> None:
    """No caption_id twice in one bucket. A bucket holds whole images, so this covers every
    duplicate of one image's captions; caption_id hashes (image_ref, caption, line), so a
    duplicate across two images would be a 64-bit hash collision (not looked for)."""
    if len(ids) < 2 or pc.count_distinct(ids).as_py() == len(ids):
        return
    ordered = pc.sort_indices(ids)
    sorted_ids = ids.take(ordered)
    same = pc.equal(sorted_ids.slice(1), sorted_ids.slice(0, len(ids) - 1))
    dup = sorted_ids.slice(1).filter(same)[0]
    raise InputError(f"{where}: duplicate caption_id {dup.as_py()!r}")


def near_duplicate_check(images: ImageTable) -> dict[str, Any] | None:
    """curate's near-duplicate groups among the paired images, and the contamination check:
    val/test images with a near-copy in train, in the final split (0: a group has one split)
    and as it would be had each image been split on its own. None without any group (the
    report stays as it was before curate)."""
    if images.group_keys is None:
        return None
    used = np.flatnonzero(images.used)
    _, group, sizes = np.unique(images.group_keys[used], axis=0, return_inverse=True,
                                return_counts=True)  # fmt: skip
    group = group.ravel()
    if not len(used) or sizes.max() < 2:
        return None

    def contaminated(split: np.ndarray) -> int:
        train = np.zeros(len(sizes), dtype=bool)
        train[group[split == 0]] = True
        return int(((split != 0) & train[group]).sum())

    in_groups = sizes[group] > 1
    return {
        "groups": int((sizes > 1).sum()),
        "images_in_groups": int(in_groups.sum()),
        # val/test images with a near-copy in train: the split by group must leave none
        "contaminated_images": contaminated(images.split[used]),
        "contaminated_images_if_split_by_image": contaminated(images.alone[used]),
    }


def make_report(
    tally: Tally,
    images: ImageTable,
    orphan_images: int,
    p: AlignParams,
    unknown: Counter[str] | None = None,
) -> dict[str, Any]:
    """The align report, with the accounting identities asserted."""
    n_pairs = sum(tally.pairs.values())
    groups = Counter(images.split[images.used].tolist())
    labelled = sum(tally.labelled.values())
    report = {
        "images": len(images),
        "captions": tally.records,
        "pairs": n_pairs,
        "orphan_images": orphan_images,
        "orphan_captions": sum(tally.orphan_captions.values()),
        "orphan_captions_by_reason": dict(sorted(tally.orphan_captions.items())),
        "images_per_split": {s: groups.get(i, 0) for i, s in enumerate(SPLITS)},
        "pairs_per_split": {s: tally.pairs.get(s, 0) for s in SPLITS},
        "classes": tally.classes(p.top_k_labels),
        "label_separator": tally.separator,
        "multi_label_pairs": tally.multi_label,
        # labelled, but no class of the label is a class (top_k_labels' <unk>): never a target
        "unknown_label_pairs_per_split": {s: (unknown or {}).get(s, 0) for s in SPLITS},
        "labelled_pairs": labelled,
        "unlabelled_pairs": n_pairs - labelled,
        "labelled_pairs_per_split": {s: tally.labelled.get(s, 0) for s in SPLITS},
        "pairs_per_class": dict(sorted(tally.per_class.items())),
        "params_hash": section_hash(p),
    }
    near = near_duplicate_check(images)
    if near is not None:
        report["near_duplicates"] = near
        check(near["contaminated_images"] == 0, f"a near-duplicate group straddles splits: {near}")
    # every accepted record is either paired or an orphan, never both, never lost
    check(report["images"] == sum(groups.values()) + report["orphan_images"], f"images: {report}")
    check(report["captions"] == report["pairs"] + report["orphan_captions"], f"captions: {report}")
    return report


def run_align(ingest_dir: Path, p: AlignParams, out_dir: Path) -> dict[str, Any]:
    """Write pairs.parquet, orphans.jsonl and report.json (last) into out_dir; return the report.

    ``ingest_dir`` holds records.parquet and images.parquet: curate's (the pipeline's), or
    ingest's; an images.parquet with a ``group_id`` column is split by group.

    report.json holds counts only; the returned dict adds ``seconds`` (log and MLflow).
    """
    start = time.perf_counter()
    ingest_dir, out_dir = Path(ingest_dir), Path(out_dir)
    use_system_arrow_allocator()
    records_pf = _parquet(ingest_dir / "records.parquet", RECORD_COLUMNS)
    images = ImageTable(ingest_dir / "images.parquet", p)
    out_dir.mkdir(parents=True, exist_ok=True)
    tally = Tally(label_separator(records_pf))
    with (
        atomic_path(out_dir / "orphans.jsonl") as orphans_path,
        orphans_path.open("w", encoding="utf-8") as fh,
        scratch_dir(out_dir / ".work") as work,
    ):
        audio = AUDIO_PATH.name in records_pf.schema_arrow.names
        schema = PAIR_SCHEMA.append(AUDIO_PATH) if audio else PAIR_SCHEMA
        buckets = Buckets(work, _bucket_digits(records_pf.metadata.num_rows), schema)
        columns = [*RECORD_COLUMNS, AUDIO_PATH.name] if audio else list(RECORD_COLUMNS)
        for batch in iter_batches(records_pf, BATCH, columns):
            tally.records += batch.num_rows
            pairs, orphans = _pairs_of_batch(batch, images)
            _write_orphan_captions(fh, orphans, tally)
            tally.add(pairs)
            buckets.add(pairs)
        release_arrow_memory()
        if not sum(tally.pairs.values()):
            raise InputError(
                f"{ingest_dir}: no caption points to an accepted image; nothing to align"
            )
        orphan_images = _write_orphan_images(fh, images)
        images.drop_lookups()
        where = ingest_dir / "records.parquet"
        classes = tally.classes(p.top_k_labels)
        unknown = _write_pairs(buckets, classes, out_dir / "pairs.parquet", where, tally.separator)
    fault_point("align:pairs-written")
    report = make_report(tally, images, orphan_images, p, unknown)
    _warn_empty_splits(report)
    write_json_atomic(out_dir / "report.json", report)
    seconds = time.perf_counter() - start
    log.info(
        "align: %d pairs (%d labelled), %d orphan images, %d orphan captions in %.1fs (%s)",
        report["pairs"],
        report["labelled_pairs"],
        report["orphan_images"],
        report["orphan_captions"],
        seconds,
        json.dumps(report["pairs_per_split"]),
    )
    return {**report, "seconds": round(seconds, 3)}


def label_separator(records: pq.ParquetFile) -> str | None:
    """The separator of multi-labels that ingest recorded in records.parquet (None: one label)."""
    metadata = records.schema_arrow.metadata or {}
    value = metadata.get(LABEL_SEPARATOR_KEY.encode())
    return value.decode("utf-8") if value else None


def _warn_empty_splits(report: dict[str, Any]) -> None:
    for split, n in report["pairs_per_split"].items():
        if n == 0:
            log.warning(
                "align: split %r is empty (%d image groups in total)",
                split,
                sum(report["images_per_split"].values()),
            )


def read_align_report(align_dir: Path) -> dict[str, Any]:
    """align's report.json, or an InputError saying how to produce it."""
    path = Path(align_dir) / "report.json"
    if not path.is_file():
        raise InputError(f"{path}: not found; run `mmpipe align` first")
    return read_json(path)
