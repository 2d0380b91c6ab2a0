"""Dense indexes behind one small protocol: add vectors with ids, search by inner product, save and load.

Vectors are unit length (the encoder normalizes), so the inner product is the
cosine. Two implementations:

- :class:`ExactIndex`: numpy, every vector scored; the oracle, and the choice for small stores.
- :class:`HnswIndex`: an HNSW graph from faiss-cpu, chosen by measurement among faiss-cpu, hnswlib
  and usearch at the same graph parameters (``scripts/bench_stores.py --compare``; figures in
  docs/stores.md, "Measured"): the best recall-latency pair of the three, and the most actively kept
  (hnswlib's last release is from 2023).

:func:`build_index` picks by size (:data:`APPROXIMATE_FROM`). An index is saved
to a folder of its own (0700, files 0600), written beside the target and
renamed into place, so a reader sees a whole index or none; nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

import numpy as np

from tpm_fed.storage.atomic import write_folder_atomically

APPROXIMATE_FROM = 20_000
"""Vectors from which :func:`build_index` builds an approximate index: below it, exact search of one query
takes a few milliseconds here, and an exact answer needs no recall caveat."""

HNSW_M = 32
"""Graph degree. With :data:`HNSW_EF_CONSTRUCTION` and :data:`HNSW_EF_SEARCH`, the setting measured at
100,000 x 384 (recall@10 and latency in docs/stores.md)."""
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128

PARAMS_FILE = "index.json"


@dataclass(frozen=True)
class Hits:
    """The best ``k`` of each query: ``ids`` ``[queries, k]`` int64 (-1 where fewer exist) and their ``scores``
    (inner products, -inf where no id), best first."""

    ids: np.ndarray
    scores: np.ndarray


class VectorIndex(Protocol):
    """A dense index of unit vectors.

    Attributes:
        params: What the index is (kind, metric, dimensions and build parameters): part of a snapshot's
            content id, so the same chunks indexed otherwise are another snapshot.
    """

    params: dict[str, Any]

    def __len__(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` (``[n, dimensions]`` float32) under ``ids`` (``[n]`` non-negative int64, unique)."""
        ...

    def search(self, queries: np.ndarray, k: int) -> Hits:
        """The ``k`` best ids of each query (``[q, dimensions]``, or one ``[dimensions]`` vector)."""
        ...

    def save(self, folder: Path) -> None:
        """Write the index to ``folder`` (created 0700, files 0600; replaced whole)."""
        ...


def _queries(queries: np.ndarray, dimensions: int) -> np.ndarray:
    array = np.asarray(queries, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dimensions:
        raise ValueError(f"queries must be [n, {dimensions}], not {list(array.shape)}")
    return np.ascontiguousarray(array)


def _checked(ids: np.ndarray, vectors: np.ndarray, dimensions: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if vectors.ndim != 2 or vectors.shape[1] != dimensions or vectors.shape[0] != ids.shape[0]:
        raise ValueError(f"add takes [n] ids and [n, {dimensions}] vectors, not {list(ids.shape)} and "
                         f"{list(vectors.shape)}")
    if ids.size and ids.min() < 0:
        raise ValueError("ids must be non-negative")
    return ids, vectors


class ExactIndex:
    """Every vector scored by one matrix product: exact, and the oracle approximate indexes are measured against."""

    def __init__(self, dimensions: int) -> None:
        self.dimensions = dimensions
        self.params: dict[str, Any] = {"kind": "exact", "metric": "inner_product", "dimensions": dimensions}
        self._ids = np.empty(0, dtype=np.int64)
        self._vectors = np.empty((0, dimensions), dtype=np.float32)

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = _checked(ids, vectors, self.dimensions)
        if np.intersect1d(ids, self._ids).size or np.unique(ids).size != ids.size:
            raise ValueError("ids must be unique")
        self._ids = np.concatenate([self._ids, ids])
        self._vectors = np.concatenate([self._vectors, vectors]) if len(self) > ids.size else vectors

    def search(self, queries: np.ndarray, k: int) -> Hits:
        queries = _queries(queries, self.dimensions)
        ids = np.full((queries.shape[0], k), -1, dtype=np.int64)
        scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
        found = min(k, len(self))
        if found == 0:
            return Hits(ids, scores)
        all_scores = queries @ self._vectors.T
        # argpartition finds the k best in linear time; only those k are sorted.
        top = np.argpartition(-all_scores, found - 1, axis=1)[:, :found]
        top_scores = np.take_along_axis(all_scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        ids[:, :found] = self._ids[np.take_along_axis(top, order, axis=1)]
        scores[:, :found] = np.take_along_axis(top_scores, order, axis=1)
        return Hits(ids, scores)

    def save(self, folder: Path) -> None:
        def write(tmp: Path) -> None:
            np.save(tmp / "ids.npy", self._ids, allow_pickle=False)
            np.save(tmp / "vectors.npy", self._vectors, allow_pickle=False)

        _write_folder(folder, self.params, write)

    @classmethod
    def load(cls, folder: Path) -> Self:
        params = _read_params(folder, "exact")
        index = cls(int(params["dimensions"]))
        index._ids = np.load(folder / "ids.npy", allow_pickle=False)
        index._vectors = np.load(folder / "vectors.npy", allow_pickle=False)
        return index


class HnswIndex:
    """An HNSW graph over inner products (faiss-cpu's ``IndexHNSWFlat``): approximate, logarithmic search.

    The graph numbers vectors in the order they were added; ``ids`` maps those positions to the caller's
    ids here, in numpy. (faiss's own id map, ``IndexIDMap2``, translates results in an OpenMP loop whose
    threads cost ~30 ms a query on this shared 2-core machine against 0.3 ms without it.)

    Args:
        dimensions: Vector length.
        m, ef_construction, ef_search: The graph's parameters (recall against speed).
    """

    def __init__(self, dimensions: int, *, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
                 ef_search: int = HNSW_EF_SEARCH) -> None:
        import faiss

        self.dimensions = dimensions
        self.params: dict[str, Any] = {"kind": "hnsw", "library": "faiss", "metric": "inner_product",
                                       "dimensions": dimensions, "m": m, "ef_construction": ef_construction,
                                       "ef_search": ef_search}
        self._graph = faiss.IndexHNSWFlat(dimensions, m, faiss.METRIC_INNER_PRODUCT)
        self._graph.hnsw.efConstruction = ef_construction
        self._graph.hnsw.efSearch = ef_search
        self._ids = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = _checked(ids, vectors, self.dimensions)
        if np.unique(ids).size != ids.size or np.isin(ids, self._ids).any():
            raise ValueError("ids must be unique")
        self._graph.add(vectors)
        self._ids = np.concatenate([self._ids, ids])

    def search(self, queries: np.ndarray, k: int) -> Hits:
        import faiss

        queries = _queries(queries, self.dimensions)
        if len(self) == 0:
            return Hits(np.full((queries.shape[0], k), -1, dtype=np.int64),
                        np.full((queries.shape[0], k), -np.inf, dtype=np.float32))
        # efSearch below k would find fewer than k: the graph searches at least k candidates.
        params = faiss.SearchParametersHNSW(efSearch=max(int(self.params["ef_search"]), k))
        scores, positions = self._graph.search(queries, k, params=params)
        found = positions >= 0
        ids = np.where(found, self._ids[np.where(found, positions, 0)], -1)
        return Hits(ids.astype(np.int64), np.where(found, scores, -np.inf).astype(np.float32))

    def save(self, folder: Path) -> None:
        import faiss

        def write(tmp: Path) -> None:
            faiss.write_index(self._graph, str(tmp / "graph.faiss"))
            np.save(tmp / "ids.npy", self._ids, allow_pickle=False)

        _write_folder(folder, self.params, write)

    @classmethod
    def load(cls, folder: Path) -> Self:
        import faiss

        params = _read_params(folder, "hnsw")
        index = cls.__new__(cls)
        index.dimensions = int(params["dimensions"])
        index.params = params
        index._graph = faiss.read_index(str(folder / "graph.faiss"))
        index._ids = np.load(folder / "ids.npy", allow_pickle=False)
        if index._graph.ntotal != index._ids.shape[0]:
            raise ValueError(f"{folder}: the graph holds {index._graph.ntotal} vectors, its ids {index._ids.shape[0]}")
        return index


KINDS: dict[str, Any] = {"exact": ExactIndex, "hnsw": HnswIndex}


def build_index(ids: np.ndarray, vectors: np.ndarray, *, approximate: bool | None = None) -> VectorIndex:
    """An index of ``vectors``: exact below :data:`APPROXIMATE_FROM` vectors, HNSW from there (or as asked)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    dimensions = int(vectors.shape[1])
    if approximate is None:
        approximate = vectors.shape[0] >= APPROXIMATE_FROM
    index: VectorIndex = HnswIndex(dimensions) if approximate else ExactIndex(dimensions)
    index.add(ids, vectors)
    return index


def load_index(folder: Path) -> VectorIndex:
    """The index saved in ``folder``, whichever kind it is.

    Raises:
        ValueError: No index there, or one of an unknown kind.
    """
    kind = _read_params(folder, None)["kind"]
    return KINDS[kind].load(folder)


def _read_params(folder: Path, kind: str | None) -> dict[str, Any]:
    try:
        params = json.loads((folder / PARAMS_FILE).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"no index in {folder}: {error}") from None
    if params.get("kind") not in KINDS or (kind is not None and params["kind"] != kind):
        raise ValueError(f"{folder} holds an index of kind {params.get('kind')!r}, not {kind or 'a known one'!r}")
    return params


def _write_folder(folder: Path, params: dict[str, Any], write) -> None:
    """Write an index folder (0700, files 0600), put in place whole: ``write(staging)``, then its parameters."""
    def fill(staging: Path) -> None:
        write(staging)
        (staging / PARAMS_FILE).write_text(json.dumps(params, sort_keys=True))

    write_folder_atomically(folder, fill)
