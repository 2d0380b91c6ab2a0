"""One search of one snapshot: the query's unit vector against the chunks', filtered, ranked, cut.

Scores are cosine similarities (the vectors are unit length), as OpenAI's ``score`` in 0..1 for the texts
that matter; ``ranking_options.score_threshold`` drops hits below it. With ``ranking_options.hybrid_search``
the dense ranking is fused with a BM25 ranking of the same chunks (:mod:`tpm_fed.stores.hybrid`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tpm_fed.stores.filters import check_keys, matches
from tpm_fed.stores.protocol import Filter, RankingOptions
from tpm_fed.stores.snapshots import ChunkRecord, Snapshot


@dataclass(frozen=True)
class Hit:
    chunk: ChunkRecord
    score: float


def search_snapshot(snapshot: Snapshot, query_vector: np.ndarray, query_text: str, limit: int,
                    condition: Filter | None = None, ranking: RankingOptions | None = None) -> list[Hit]:
    """The best ``limit`` chunks of ``snapshot`` for the query, best first.

    Raises:
        InvalidRequest: A filter on an attribute no file of the snapshot has.
    """
    check_keys(condition, snapshot.attribute_keys())
    if not snapshot.chunks:
        return []
    allowed = np.array([matches(condition, chunk.attributes) for chunk in snapshot.chunks]) \
        if condition is not None else None
    scores = dense_scores(snapshot, query_vector)
    if ranking is not None and ranking.hybrid_search is not None:
        from tpm_fed.stores.hybrid import fuse_scores  # type: ignore[attr-defined]

        scores = fuse_scores(scores, [chunk.text for chunk in snapshot.chunks], query_text, ranking)
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    order = np.argsort(-scores, kind="stable")[:limit]
    threshold = ranking.score_threshold if ranking is not None else 0.0
    return [Hit(snapshot.chunks[i], float(scores[i])) for i in order
            if np.isfinite(scores[i]) and (threshold <= 0 or scores[i] >= threshold)]


def dense_scores(snapshot: Snapshot, query_vector: np.ndarray) -> np.ndarray:
    """Every chunk's cosine with the query (exact)."""
    return snapshot.vectors @ np.asarray(query_vector, dtype=np.float32).reshape(-1)
