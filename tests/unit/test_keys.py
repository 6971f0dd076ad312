"""mmpipe.keys: the sorted key index that replaces whole-set hash tables in ingest and align."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mmpipe.keys import KeyIndex, arrow_keys, string_keys


def test_find_returns_the_first_row_of_each_key_and_minus_one_when_absent():
    values = ["b.jpg", "a.jpg", "b.jpg", "c/d.jpg", "a.jpg"]
    index = KeyIndex.build(string_keys(values))
    found = index.find(string_keys(["a.jpg", "b.jpg", "c/d.jpg", "nope.jpg", "A.jpg"]))
    assert found.tolist() == [1, 0, 3, -1, -1]
    assert index.repeated().tolist() == [2, 4]  # later copies, in row order


def test_keys_agree_between_python_and_arrow_and_differ_between_strings():
    values = ["images/0001.jpg", "images/0002.jpg", "", "caf\u00e9.jpg", None]
    keys = string_keys(values)
    assert np.array_equal(keys, arrow_keys(pa.array(values, pa.string())))
    assert len({tuple(k) for k in keys[:4].tolist()}) == 4
    assert tuple(keys[4]) == tuple(keys[2])  # a null is keyed as "" (callers mask nulls)


def test_same_first_64_bits_are_still_told_apart():
    # keys that collide on their first 64 bits: the second 64 bits decide, exactly
    keys = np.array([[7, 3], [5, 1], [7, 1], [7, 2], [7, 1]], dtype=np.uint64)
    index = KeyIndex.build(keys)
    probe = np.array([[7, 2], [7, 1], [7, 3], [7, 9], [5, 1], [6, 1]], dtype=np.uint64)
    assert index.find(probe).tolist() == [3, 2, 0, -1, 1, -1]
    assert index.repeated().tolist() == [4]


def test_empty_index_and_empty_probe():
    empty = KeyIndex.build(np.zeros((0, 2), dtype=np.uint64))
    assert empty.find(string_keys(["x"])).tolist() == [-1]
    assert len(empty.repeated()) == 0
    assert KeyIndex.build(string_keys(["x"])).find(string_keys([])).tolist() == []
