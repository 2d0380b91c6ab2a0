"""One search of one snapshot: the query's unit vector against the chunks', filtered, ranked, cut.

Scores are cosine similarities (the vectors are unit length); with ``ranking_options.hybrid_search`` they
are the fused scores of :mod:`tpm_fed.stores.hybrid` (in (0, 1]); ``ranking_options.score_threshold``
drops hits below it.
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

    Without a filter the snapshot's own index answers (exact, or HNSW for a large snapshot), fused with BM25
    by :func:`~tpm_fed.stores.hybrid.hybrid_search` when ``hybrid_search`` weights are given. With a filter,
    every chunk that passes it is scored exactly (an approximate index's top k could hold none of them).

    Raises:
        InvalidRequest: A filter on an attribute no file of the snapshot has; both hybrid weights 0.
    """
    from tpm_fed.stores.hybrid import fuse_scores, hybrid_search

    if condition is not None:
        check_keys(condition, snapshot.attribute_keys())
    if not snapshot.chunks:
        return []
    query_vector = np.asarray(query_vector, dtype=np.float32).reshape(-1)
    hybrid = ranking.hybrid_search if ranking is not None else None
    if condition is None:
        if hybrid is not None:
            found = hybrid_search(snapshot.index, snapshot.lexical, query_vector, query_text, limit,
                                  hybrid.embedding_weight, hybrid.text_weight)
        else:
            found = snapshot.index.search(query_vector, limit)
        pairs = [(int(i), float(score)) for i, score in zip(found.ids[0], found.scores[0]) if i >= 0]
    else:
        file_of_chunk, attributes = snapshot.files()
        allowed = np.array([matches(condition, pairs) for pairs in attributes], dtype=bool)[file_of_chunk]
        scores = snapshot.vectors @ query_vector
        if hybrid is not None:
            scores = fuse_scores(scores, [c.text for c in snapshot.chunks], query_text, ranking, snapshot.lexical)
        scores = np.where(allowed, scores, -np.inf)
        order = np.argsort(-scores, kind="stable")[:limit]
        pairs = [(int(i), float(scores[i])) for i in order if np.isfinite(scores[i])]
    threshold = ranking.score_threshold if ranking is not None else 0.0
    return [Hit(snapshot.chunks[i], score) for i, score in pairs if threshold <= 0 or score >= threshold]
