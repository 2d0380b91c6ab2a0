"""Vector stores' search core and ingestion, as ratios against baselines run in the same process.

* Index: recall@10 of the approximate index (:class:`tpm_fed.stores.index.HnswIndex`, faiss) against exact
  search (:class:`~tpm_fed.stores.index.ExactIndex`, the oracle) on ``--chunks`` vectors (100,000 by
  default) of 384 dimensions, and the search latency of one query (p50, p95; the query's embedding is not
  included), the approximate index's over the exact one's. ``--compare`` also builds hnswlib's and
  usearch's HNSW at the same parameters: the measurement faiss-cpu was chosen by.
* Ingestion: texts per second encoding ``--texts`` real text chunks through the federation (an in-process
  :class:`~tpm_fed.service.runtime.Runtime`: broker, ledger, the local site's worker running the encoder
  backend, requests of 32 texts as a store sends them) over sentence-transformers' own ``encode`` loop on
  the same model folder in this process; the vectors are checked equal (max abs diff).

The vectors of the index part are synthetic: unit vectors around 1,000 random centres (as embeddings of
texts on many topics cluster), queries drawn from the same centres; encoding 100,000 real chunks here would
take longer than the rest together. Progress goes to stderr; figures, with the load average, to stdout.

Usage:
    python scripts/bench_stores.py [--chunks 100000] [--queries 200] [--texts 1024] [--repeats 3] [--compare]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import log, machine

DIMENSIONS, K = 384, 10


def clustered(n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, DIMENSIONS)).astype(np.float32)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, DIMENSIONS), dtype=np.float32)
        for start in range(0, count, 20_000):  # in pieces: a 100,000 x 384 float64 draw is 300 MB
            part = min(20_000, count - start)
            rows = centres[rng.integers(0, 1000, part)] + 0.9 * rng.standard_normal((part, DIMENSIONS),
                                                                                     dtype=np.float32)
            out[start:start + part] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return out

    return draw(n), draw(queries)


def latencies(search, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    found, seconds = [], []
    for query in queries:
        started = time.perf_counter()
        ids = search(query)
        seconds.append(time.perf_counter() - started)
        found.append(ids)
    return np.array(found), seconds


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def ms(seconds: list[float], share: float) -> float:
    return 1000 * float(np.percentile(seconds, share))


def bench_index(chunks: int, queries: int, compare: bool) -> None:
    from tpm_fed.stores.index import (
        HNSW_EF_CONSTRUCTION,
        HNSW_EF_SEARCH,
        HNSW_M,
        ExactIndex,
        HnswIndex,
    )

    log(f"index: drawing {chunks:,} x {DIMENSIONS} vectors")
    vectors, asked = clustered(chunks, queries)
    ids = np.arange(chunks, dtype=np.int64)
    exact = ExactIndex(DIMENSIONS)
    exact.add(ids, vectors)
    log("index: exact search (the oracle)")
    truth, exact_s = latencies(lambda q: exact.search(q, K).ids[0], asked)
    candidates = {"HnswIndex/faiss": lambda: _ours(HnswIndex, ids, vectors)}
    if compare:
        candidates["hnswlib"] = lambda: _hnswlib(ids, vectors, HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH)
        candidates["usearch"] = lambda: _usearch(ids, vectors, HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH)
    print(f"index ({chunks:,} chunks x {DIMENSIONS} dims, {queries} queries, k={K}; HNSW M={HNSW_M}, "
          f"ef_construction={HNSW_EF_CONSTRUCTION}, ef_search={HNSW_EF_SEARCH}):")
    print(f"  exact (numpy)   p50 {ms(exact_s, 50):7.2f} ms  p95 {ms(exact_s, 95):7.2f} ms  recall@10 1.0000")
    for name, build in candidates.items():
        log(f"index: building {name}")
        started = time.perf_counter()
        search = build()
        built = time.perf_counter() - started
        found, seconds = latencies(search, asked)
        print(f"  {name:<15} p50 {ms(seconds, 50):7.2f} ms  p95 {ms(seconds, 95):7.2f} ms  "
              f"recall@10 {recall(found, truth):.4f}  build {built:6.1f} s  "
              f"p50 vs exact {ms(seconds, 50) / ms(exact_s, 50):.3f}x", flush=True)


def _ours(cls, ids: np.ndarray, vectors: np.ndarray):
    index = cls(DIMENSIONS)
    index.add(ids, vectors)
    return lambda q: index.search(q, K).ids[0]


def _hnswlib(ids: np.ndarray, vectors: np.ndarray, m: int, ef_construction: int, ef_search: int):
    import hnswlib

    index = hnswlib.Index(space="ip", dim=DIMENSIONS)
    index.init_index(max_elements=len(ids), ef_construction=ef_construction, M=m)
    index.add_items(vectors, ids, num_threads=os.cpu_count() or 1)
    index.set_ef(ef_search)
    return lambda q: index.knn_query(q, k=K, num_threads=1)[0][0]


def _usearch(ids: np.ndarray, vectors: np.ndarray, m: int, ef_construction: int, ef_search: int):
    from usearch.index import Index

    index = Index(ndim=DIMENSIONS, metric="ip", dtype="f32", connectivity=m, expansion_add=ef_construction,
                  expansion_search=ef_search)
    index.add(ids, vectors, threads=os.cpu_count() or 1)
    return lambda q: index.search(q, K).keys


def real_chunks(tokenizer, count: int, tokens_per_chunk: int = 200) -> list[str]:
    """Chunks of real English: the repository's docs and the demo corpus, cut every ``tokens_per_chunk``
    tokens of the encoder's own tokenizer (inside its 256 with room to spare), repeated with a counter
    until there are ``count``."""
    root = Path(__file__).resolve().parent.parent
    text = " ".join(path.read_text() for path in sorted((root / "docs").glob("*.md")))
    text += (root / "tpm_fed" / "models" / "corpus.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    pieces = [tokenizer.decode(ids[i:i + tokens_per_chunk]) for i in range(0, len(ids) - tokens_per_chunk,
                                                                         tokens_per_chunk)]
    return [f"{pieces[i % len(pieces)]} ({i})" for i in range(count)]


def bench_ingestion(texts_count: int, repeats: int) -> None:
    from sentence_transformers import SentenceTransformer

    from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
    from tpm_fed.home import TpmHome
    from tpm_fed.identity import LocalUser
    from tpm_fed.models.encoder import DEFAULT_ENCODER_NAME, default_encoder_dir
    from tpm_fed.protocol.encoding import EncodeRequest
    from tpm_fed.service.runtime import Runtime

    folder = default_encoder_dir()
    log(f"ingestion: loading sentence-transformers on {folder}")
    model = SentenceTransformer(str(folder), device="cpu")
    texts = real_chunks(model.tokenizer, texts_count)
    tokens = sum(len(ids) for ids in model.tokenizer(texts)["input_ids"])
    with tempfile.TemporaryDirectory() as tmp:
        home = TpmHome(Path(tmp))
        home.create()
        Federation(name="bench", sites=[SiteConfig(name="local")],
                   models=[ModelConfig(name=DEFAULT_ENCODER_NAME, path=folder, kinds=["encode"])],
                   projects=[ProjectConfig(name="bench", members=[LocalUser().current()],
                                           allocations={"local": 1e9})]).dump(home.federation_file)
        with Runtime(home) as runtime:
            def federation() -> np.ndarray:
                futures = [runtime.submit(EncodeRequest.create(DEFAULT_ENCODER_NAME, texts=texts[i:i + 32]))
                           for i in range(0, len(texts), 32)]
                return np.concatenate([future.result(timeout=3600).vectors for future in futures])

            def own_loop() -> np.ndarray:
                return model.encode(texts, batch_size=32, normalize_embeddings=True)

            log("ingestion: warming the federation's replica (its cold start is not timed)")
            runtime.submit(EncodeRequest.create(DEFAULT_ENCODER_NAME, texts=texts[:32])).result(timeout=600)
            served_s, own_s, ratios = [], [], []
            for repeat in range(repeats):
                log(f"ingestion: repeat {repeat + 1}/{repeats}")
                started = time.perf_counter()
                expected = own_loop()
                own_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                served = federation()
                served_s.append(time.perf_counter() - started)
                ratios.append(own_s[-1] / served_s[-1])
                print(f"  repeat {repeat + 1}: own loop {own_s[-1]:.2f} s, federation {served_s[-1]:.2f} s, "
                      f"ratio {ratios[-1]:.3f}x ({machine()})", flush=True)
            difference = float(np.abs(served - expected).max())
    print(f"ingestion ({len(texts)} chunks, {tokens:,} tokens, {repeats} repeats, each pair back to back):")
    print(f"  sentence-transformers encode  best {len(texts) / min(own_s):7.1f} chunks/s "
          f"({tokens / min(own_s):8.0f} tokens/s)")
    print(f"  through the federation        best {len(texts) / min(served_s):7.1f} chunks/s "
          f"({tokens / min(served_s):8.0f} tokens/s)")
    print(f"  ratio federation / own loop: median {float(np.median(ratios)):.3f}x "
          f"(each repeat: {', '.join(f'{r:.3f}' for r in ratios)}); max abs diff of the vectors {difference:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", action="store_true", help="also hnswlib and usearch HNSW (pip install hnswlib usearch)")
    parser.add_argument("--skip", choices=["index", "ingestion"], action="append", default=[])
    args = parser.parse_args()
    print(f"bench_stores: {machine()}")
    if "index" not in args.skip:
        bench_index(args.chunks, args.queries, args.compare)
    if "ingestion" not in args.skip:
        bench_ingestion(args.texts, args.repeats)
    print(f"bench_stores: done, {machine()}")


if __name__ == "__main__":
    main()
