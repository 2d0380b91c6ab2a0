"""Hybrid ranking as OpenAI's ``ranking_options.hybrid_search``: weighted reciprocal rank fusion of the
dense (embedding) ranking and the BM25 (text) ranking.

OpenAI documents ``embedding_weight`` and ``text_weight`` as "the weight of the
embedding / of the text in the reciprocal ranking fusion", and
``score_threshold`` as a number in [0, 1] (closer to 1: only the most relevant
results, maybe fewer of them); it does not publish the fusion constant nor how
a fused score maps to [0, 1]. What tpm-fed does, exactly:

    fused(c) = ( w_e / (K + rank_e(c)) + w_t / (K + rank_t(c)) ) / ( (w_e + w_t) / (K + 1) )

``rank_e`` is the chunk's 1-based place by cosine with the query, ``rank_t`` its
place by BM25 among chunks sharing a word with the query (a chunk sharing none
gets no text term), K = :data:`RRF_K` = 60 (Cormack, Clarke and Büttcher, 2009,
as Elasticsearch, Weaviate and MongoDB use it). The denominator makes a chunk
first in both rankings score 1.0, so every fused score is in (0, 1] and
``score_threshold`` means the same for any weights. With ``text_weight`` 0 the
order is the dense order; with ``embedding_weight`` 0, the BM25 order first.
Both weights 0 rank nothing and are refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.stores.index import Hits, VectorIndex
from tpm_fed.stores.lexical import LexicalIndex

RRF_K = 60
"""The reciprocal-rank constant: larger flattens the difference between neighbouring ranks."""

CANDIDATES = 100
"""With an index, each side ranks its best this many (at least k) chunks; a chunk outside one side's list
gets nothing from that side, as in any engine fusing top-n lists."""


def check_weights(embedding_weight: float, text_weight: float) -> None:
    """Raises InvalidRequest unless both weights are finite, >= 0, and not both 0."""
    for name, weight in (("embedding_weight", embedding_weight), ("text_weight", text_weight)):
        if not np.isfinite(weight) or weight < 0:
            raise InvalidRequest(f"ranking_options.hybrid_search.{name} must be a number >= 0, not {weight}")
    if embedding_weight == 0 and text_weight == 0:
        raise InvalidRequest("ranking_options.hybrid_search: embedding_weight and text_weight are both 0, "
                             "which ranks nothing; give one of them a weight above 0")


def ranks(scores: np.ndarray, counted: np.ndarray | None = None) -> np.ndarray:
    """Each item's 1-based place by descending score (ties in id order); 0 where not ``counted``."""
    scores = np.asarray(scores, dtype=np.float64)
    counted = np.isfinite(scores) if counted is None else counted & np.isfinite(scores)
    members = np.flatnonzero(counted)
    order = members[np.argsort(-scores[members], kind="stable")]
    place = np.zeros(scores.shape[0], dtype=np.int64)
    place[order] = np.arange(1, order.size + 1)
    return place


def fuse(dense_ranks: np.ndarray, text_ranks: np.ndarray, embedding_weight: float, text_weight: float,
         k: int = RRF_K) -> np.ndarray:
    """The fused score of every item from its two 1-based ranks (0: not ranked on that side), in [0, 1]."""
    check_weights(embedding_weight, text_weight)
    dense = np.where(dense_ranks > 0, embedding_weight / (k + dense_ranks.astype(np.float64)), 0.0)
    text = np.where(text_ranks > 0, text_weight / (k + text_ranks.astype(np.float64)), 0.0)
    return ((dense + text) / ((embedding_weight + text_weight) / (k + 1))).astype(np.float32)


def fuse_scores(dense_scores: np.ndarray, texts: list[str], query: str, ranking: Any,
                lexical: LexicalIndex | None = None) -> np.ndarray:
    """Every chunk's fused score, from its cosines and BM25 over ``texts`` (all chunks ranked on both sides).

    Args:
        dense_scores: Each chunk's cosine with the query (``-inf`` for none).
        texts: The chunks' texts, in the same order (BM25 is built over them unless ``lexical`` is given).
        ranking: Anything with ``hybrid_search.embedding_weight`` and ``.text_weight`` (OpenAI's ``ranking_options``).
        lexical: A BM25 index of ``texts`` kept with the snapshot, to skip building one per query.
    """
    weights = ranking.hybrid_search
    lexical = lexical if lexical is not None else LexicalIndex.build(texts)
    text_scores = lexical.scores(query)
    return fuse(ranks(dense_scores), ranks(text_scores, text_scores > 0),
                float(weights.embedding_weight), float(weights.text_weight))


def hybrid_search(index: VectorIndex, lexical: LexicalIndex, query_vector: np.ndarray, query: str, k: int,
                  embedding_weight: float, text_weight: float, candidates: int = CANDIDATES) -> Hits:
    """The best ``k`` chunks by fused score, from the dense index's and BM25's top ``candidates`` each.

    Ids are the chunks' positions (the dense index must hold them under the same ids as ``lexical``).
    """
    check_weights(embedding_weight, text_weight)
    depth = max(k, candidates)
    dense = index.search(query_vector, depth)
    text = lexical.search(query, depth)
    pool = np.union1d(dense.ids[0][dense.ids[0] >= 0], text.ids[0][text.ids[0] >= 0])
    ids = np.full((1, k), -1, dtype=np.int64)
    scores = np.full((1, k), -np.inf, dtype=np.float32)
    if pool.size == 0:
        return Hits(ids, scores)
    place = {int(chunk): rank for rank, chunk in enumerate(dense.ids[0], start=1) if chunk >= 0}
    text_place = {int(chunk): rank for rank, chunk in enumerate(text.ids[0], start=1) if chunk >= 0}
    fused = fuse(np.array([place.get(int(c), 0) for c in pool]), np.array([text_place.get(int(c), 0) for c in pool]),
                 embedding_weight, text_weight)
    order = np.argsort(-fused, kind="stable")[:k]
    ids[0, : order.size] = pool[order]
    scores[0, : order.size] = fused[order]
    return Hits(ids, scores)
