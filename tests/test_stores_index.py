"""The search core: dense indexes against brute force, BM25 against its formula by hand, hybrid fusion by hand.

Oracles: the exact index equals ``argsort(-(X @ q))``; the HNSW index's
recall@10 is measured against that; BM25 scores equal Lucene's formula
computed here word by word; fused scores equal the formula in
:mod:`tpm_fed.stores.hybrid` computed from ranks by hand.
"""

from __future__ import annotations

import math
import stat
from types import SimpleNamespace

import numpy as np
import pytest

from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.stores.hybrid import RRF_K, fuse, fuse_scores, hybrid_search, ranks
from tpm_fed.stores.index import ExactIndex, HnswIndex, build_index, load_index
from tpm_fed.stores.lexical import LexicalIndex, words


def unit_vectors(n: int, dimensions: int = 64, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors (as embeddings of texts on a few topics are), reproducibly."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dimensions))
    vectors = centers[rng.integers(0, clusters, n)] + 0.8 * rng.standard_normal((n, dimensions))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def brute_force(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, axis=1)


def test_the_exact_index_returns_brute_force_hits():
    vectors, queries = unit_vectors(3000), unit_vectors(20, seed=1)
    ids = np.arange(3000, dtype=np.int64) * 7 + 5  # ids are the caller's, not positions
    index = ExactIndex(64)
    index.add(ids[:1000], vectors[:1000])
    index.add(ids[1000:], vectors[1000:])  # added in two goes
    hits = index.search(queries, 10)
    expected_ids, expected_scores = brute_force(vectors, ids, queries, 10)
    assert np.array_equal(hits.ids, expected_ids)
    assert np.allclose(hits.scores, expected_scores, atol=1e-6)


def test_fewer_vectors_than_k_pad_with_minus_one_and_bad_input_is_refused():
    index = ExactIndex(64)
    index.add(np.array([3, 9]), unit_vectors(2))
    hits = index.search(unit_vectors(1, seed=2)[0], 5)  # one query as a plain vector
    assert hits.ids.shape == (1, 5) and set(hits.ids[0, :2]) == {3, 9} and list(hits.ids[0, 2:]) == [-1] * 3
    assert np.all(np.isneginf(hits.scores[0, 2:]))
    with pytest.raises(ValueError, match="unique"):
        index.add(np.array([9]), unit_vectors(1))
    with pytest.raises(ValueError, match="64"):
        index.add(np.array([10]), np.ones((1, 32), np.float32))
    with pytest.raises(ValueError, match="64"):
        index.search(np.ones(32, np.float32), 3)
    assert list(ExactIndex(64).search(unit_vectors(1)[0], 2).ids[0]) == [-1, -1]


def test_the_hnsw_index_finds_at_least_95_percent_of_the_exact_top_10():
    drawn = unit_vectors(20_100)  # queries on the corpus's own topics, as a store's queries are
    vectors, queries = drawn[:20_000], drawn[20_000:]
    ids = np.arange(20_000, dtype=np.int64)
    index = HnswIndex(64)
    for start in range(0, 20_000, 5000):
        index.add(ids[start:start + 5000], vectors[start:start + 5000])
    hits = index.search(queries, 10)
    expected, _ = brute_force(vectors, ids, queries, 10)
    recall = np.mean([len(set(found) & set(truth)) / 10 for found, truth in zip(hits.ids, expected, strict=True)])
    assert recall >= 0.95
    # Its scores are the true inner products of the ids it returns.
    assert np.allclose(hits.scores, np.einsum("qd,qkd->qk", queries, vectors[hits.ids]), atol=1e-5)


@pytest.mark.parametrize("approximate", [False, True])
def test_an_index_saved_and_loaded_answers_the_same_and_its_files_are_private(tmp_path, approximate):
    vectors, queries = unit_vectors(2000), unit_vectors(5, seed=4)
    index = build_index(np.arange(2000), vectors, approximate=approximate)
    folder = tmp_path / "snapshot" / "index"
    index.save(folder)
    index.save(folder)  # saving again replaces it whole
    loaded = load_index(folder)
    assert type(loaded) is type(index) and loaded.params == index.params and len(loaded) == 2000
    before, after = index.search(queries, 10), loaded.search(queries, 10)
    assert np.array_equal(before.ids, after.ids) and np.allclose(before.scores, after.scores)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert files and all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in files)
    assert [p.name for p in folder.parent.iterdir()] == ["index"]  # nothing left beside it


def test_build_index_is_exact_for_small_stores_and_load_refuses_what_is_not_an_index(tmp_path):
    assert build_index(np.arange(10), unit_vectors(10)).params["kind"] == "exact"
    (tmp_path / "index.json").write_text('{"kind": "pickle"}')
    with pytest.raises(ValueError, match="pickle"):
        load_index(tmp_path)
    with pytest.raises(ValueError, match="no index"):
        load_index(tmp_path / "absent")


CHUNKS = [
    "The XQ-7734 spectrometer was calibrated against a neon lamp.",
    "Neon lamps emit sharp red lines used for calibration.",
    "Rivers carry silt to the sea; deltas grow where it settles.",
    "The spectrometer's grating was replaced in March.",
    "Silt and sand settle at different speeds in the delta.",
]


def lucene_bm25(texts: list[str], query: str, k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """BM25 as Lucene scores it, word by word (the oracle for the library)."""
    docs = words(texts)
    average = sum(len(doc) for doc in docs) / len(docs)
    scores = np.zeros(len(docs))
    for word in set(words([query])[0]):
        df = sum(word in doc for doc in docs)
        if df == 0:
            continue
        idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        for i, doc in enumerate(docs):
            tf = doc.count(word)
            scores[i] += idf * tf / (tf + k1 * (1 - b + b * len(doc) / average))
    return scores


@pytest.mark.parametrize("query", ["neon calibration spectrometer", "silt delta", "XQ-7734", "nothing matches here"])
def test_bm25_scores_equal_lucenes_formula(query):
    index = LexicalIndex.build(CHUNKS)
    assert np.allclose(index.scores(query), lucene_bm25(CHUNKS, query), atol=1e-5)


def test_bm25_search_returns_only_chunks_sharing_a_word_and_survives_save_and_load(tmp_path):
    index = LexicalIndex.build(CHUNKS)
    hits = index.search("silt delta", 4)
    assert set(hits.ids[0][:2]) == {2, 4} and list(hits.ids[0][2:]) == [-1, -1]
    index.save(tmp_path / "bm25")
    loaded = LexicalIndex.load(tmp_path / "bm25")
    assert np.allclose(loaded.scores("neon spectrometer"), index.scores("neon spectrometer"))
    assert all(stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600)
               for p in [tmp_path / "bm25", *(tmp_path / "bm25").rglob("*")])
    assert not any(p.suffix in (".pkl", ".pickle") for p in (tmp_path / "bm25").rglob("*"))
    empty = LexicalIndex.build(["a", "!!"])  # no word BM25 counts
    assert list(empty.scores("a")) == [0.0, 0.0]


def test_fused_scores_equal_weighted_reciprocal_rank_fusion_by_hand():
    dense = np.array([0.9, 0.1, 0.5, 0.3])  # dense ranks 1, 4, 2, 3
    text = np.array([0.0, 2.0, 1.0, 0.0])  # text ranks -, 1, 2, -
    fused = fuse(ranks(dense), ranks(text, text > 0), 0.7, 0.3)
    norm = (0.7 + 0.3) / (RRF_K + 1)
    by_hand = [0.7 / (RRF_K + 1), 0.7 / (RRF_K + 4) + 0.3 / (RRF_K + 1), 0.7 / (RRF_K + 2) + 0.3 / (RRF_K + 2),
               0.7 / (RRF_K + 3)]
    assert np.allclose(fused, np.array(by_hand) / norm, atol=1e-6)
    first_in_both = fuse(ranks(np.array([0.9, 0.1])), ranks(np.array([3.0, 1.0])), 1.0, 2.0)
    assert first_in_both[0] == pytest.approx(1.0) and 0 < first_in_both[1] < 1


def test_the_weights_move_the_ranking_between_dense_and_text_order():
    dense = np.array([0.2, 0.9, 0.4, 0.7, 0.1])
    query = "XQ-7734 spectrometer"  # chunk 0 holds the invented name; chunk 3 only "spectrometer"
    only_dense = fuse_scores(dense, CHUNKS, query, SimpleNamespace(hybrid_search=SimpleNamespace(
        embedding_weight=1.0, text_weight=0.0)))
    assert list(np.argsort(-only_dense, kind="stable")) == list(np.argsort(-dense, kind="stable"))
    only_text = fuse_scores(dense, CHUNKS, query, SimpleNamespace(hybrid_search=SimpleNamespace(
        embedding_weight=0.0, text_weight=1.0)))
    assert list(np.argsort(-only_text, kind="stable")[:2]) == [0, 3]
    assert only_text[0] == pytest.approx(1.0) and all(only_text[[1, 2, 4]] == 0)
    with pytest.raises(InvalidRequest, match="both 0"):
        fuse(ranks(dense), ranks(dense), 0.0, 0.0)


def test_hybrid_search_with_indexes_equals_fusing_every_chunk_when_the_candidates_cover_them():
    rng = np.random.default_rng(5)
    texts = [" ".join(rng.choice(["neon", "silt", "delta", "lamp", "grating", "river", "sand", "red"], 6))
             for _ in range(300)]
    vectors, query = unit_vectors(300), unit_vectors(1, seed=6)[0]
    index, lexical = build_index(np.arange(300), vectors), LexicalIndex.build(texts)
    hits = hybrid_search(index, lexical, query, "neon delta", 10, 0.6, 0.4, candidates=300)
    everything = fuse_scores(vectors @ query, texts, "neon delta",
                             SimpleNamespace(hybrid_search=SimpleNamespace(embedding_weight=0.6, text_weight=0.4)))
    expected = np.argsort(-everything, kind="stable")[:10]
    assert np.allclose(hits.scores[0], everything[expected], atol=1e-6)
    assert set(hits.ids[0]) == set(expected) or np.allclose(np.sort(everything[hits.ids[0]]),
                                                            np.sort(everything[expected]))
