"""The vector index of one semantic partition: exact and sketch search,
updates, removal, expiry and compaction."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from aiollmcache.tiers.semantic import VectorIndex


def _unit(rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("exact_below", [10**9, 0], ids=["exact", "sketch"])
def test_the_index_finds_the_nearest_live_row(exact_below: int) -> None:
    rng = np.random.default_rng(7)
    vectors = _unit(rng.standard_normal((5000, 64)))
    index = VectorIndex(64)
    index.add_many([f"k{i}" for i in range(5000)], vectors, np.full(5000, 100.0))
    search = {"limit": 3, "exact_below": exact_below, "candidates": 64}
    for target in (0, 1234, 4999):
        query = _unit(vectors[target] + 0.02 * rng.standard_normal(64))
        best = index.search(query, 0.0, **search)[0]
        assert best.key == f"k{target}"
        assert best.similarity > 0.95
    index.remove("k1234")
    assert index.search(_unit(vectors[1234]), 0.0, **search)[0].key != "k1234"
    assert index.search(_unit(vectors[0]), 100.0, **search) == []  # all expired
    index.compact()
    assert len(index) == index.rows == 4999
    assert index.search(_unit(vectors[4999]), 0.0, **search)[0].key == "k4999"


def test_the_index_updates_a_key_in_place_and_bounds_rows() -> None:
    index = VectorIndex(8, dtype="float32")
    a, b = _unit(np.eye(8)[0]), _unit(np.eye(8)[1])
    index.add("x", a, 10.0)
    index.add("x", a, 20.0)  # same vector: expiry moved, no new row
    assert index.rows == 1
    assert index.search(a, 15.0, limit=1, exact_below=100, candidates=8)[0].key == "x"
    index.add("x", b, 20.0)  # a new vector for the key replaces the row
    assert len(index) == 1 and index.rows == 2
    assert index.search(a, 0.0, limit=1, exact_below=100, candidates=8)[0].similarity < 0.5
    for n in range(10):
        index.add(f"y{n}", _unit(np.eye(8)[n % 8] + 0.1), 20.0)
    index.compact(keep=4)
    assert len(index) == 4
    assert {c.key for c in index.search(a, 0.0, limit=8, exact_below=100, candidates=8)} == {
        "y6",
        "y7",
        "y8",
        "y9",
    }


def test_number_signatures() -> None:
    from aiollmcache.request import number_signature

    assert number_signature("Give me three tips") == number_signature("Share 3 tips") == "3"
    assert number_signature("top 10 of 2,000 items") == "10,2000"
    assert number_signature("Which one is better?") == ""  # "one" is mostly a pronoun
    assert number_signature("What is 1.5 plus two?") == "1.5,2"
    assert number_signature("no numbers here") == ""


def test_a_search_in_another_thread_never_mixes_rows_while_the_index_changes() -> None:
    import threading
    import time

    rng = np.random.default_rng(0)
    n, dims = 3000, 32
    vectors = _unit(rng.standard_normal((n, dims)))
    truth = {f"k{i}": vectors[i].astype(np.float16).astype(np.float32) for i in range(n)}
    index = VectorIndex(dims)
    index.add_many(list(truth), vectors, np.full(n, 1e12))
    stop = threading.Event()
    seen = {"searches": 0, "wrong": 0, "errors": 0}

    def searcher() -> None:
        i = 0
        while not stop.is_set():
            query = vectors[i % n]
            i += 1
            try:
                found = index.search(query, 0.0, limit=4, exact_below=500, candidates=32)
            except Exception:
                seen["errors"] += 1
                continue
            seen["searches"] += 1
            seen["wrong"] += sum(abs(float(truth[c.key] @ query) - c.similarity) > 1e-3 for c in found)

    thread = threading.Thread(target=searcher)
    thread.start()
    try:
        deadline = time.monotonic() + 1.5
        j = 0
        while time.monotonic() < deadline:  # remove, re-add and compact, over and over
            keys = [f"k{(j * 7 + m) % n}" for m in range(50)]
            j += 1
            for key in keys:
                index.remove(key)
            index.add_many(keys, np.stack([truth[k] for k in keys]), np.full(len(keys), 1e12))
            index.compact()
    finally:
        stop.set()
        thread.join()
    assert seen["searches"] > 50
    assert seen == {"searches": seen["searches"], "wrong": 0, "errors": 0}
