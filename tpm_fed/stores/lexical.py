"""BM25 over chunk texts (bm25s: sparse matrices, numpy, saved without pickle): the text side of hybrid search.

Texts are lowercased, split into words of two or more letters or digits, and
English stop words dropped (bm25s' own tokenizer), for the chunks and the query
alike. A query word no chunk has scores nothing. Scores are BM25 (Lucene's
variant, k1 1.5, b 0.75); a chunk sharing no word with the query scores 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tpm_fed.storage.atomic import write_folder_atomically
from tpm_fed.stores.index import Hits

STOPWORDS = "en"


def words(texts: list[str]) -> list[list[str]]:
    """Each text as the words BM25 counts."""
    import bm25s

    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


@dataclass
class LexicalIndex:
    """BM25 over a list of texts; a text's position in the list is its id."""

    retriever: object
    size: int

    @classmethod
    def build(cls, texts: list[str]) -> LexicalIndex:
        import bm25s

        retriever = bm25s.BM25()
        tokens = words(texts)
        if any(tokens):
            retriever.index(tokens, show_progress=False)
        else:  # no text has a word BM25 counts: every query scores 0 everywhere
            retriever = None
        return cls(retriever, len(texts))

    def __len__(self) -> int:
        return self.size

    def scores(self, query: str) -> np.ndarray:
        """Every text's BM25 score for ``query`` (``[len(self)]`` float32)."""
        if self.retriever is None:
            return np.zeros(self.size, dtype=np.float32)
        known = [word for word in words([query])[0] if word in self.retriever.vocab_dict]
        if not known:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self.retriever.get_scores(known), dtype=np.float32)

    def search(self, query: str, k: int) -> Hits:
        """The ``k`` best texts with a score above 0, best first (``[1, k]``, -1 where fewer)."""
        scores = self.scores(query)
        ids = np.full((1, k), -1, dtype=np.int64)
        best = np.full((1, k), -np.inf, dtype=np.float32)
        positive = np.flatnonzero(scores > 0)
        order = positive[np.argsort(-scores[positive], kind="stable")][:k]
        ids[0, : order.size] = order
        best[0, : order.size] = scores[order]
        return Hits(ids, best)

    def save(self, folder: Path) -> None:
        """Write to ``folder`` (0700, files 0600, no pickle), replaced whole."""
        def fill(staging: Path) -> None:
            (staging / "size").write_text(str(self.size))
            if self.retriever is not None:
                self.retriever.save(str(staging / "bm25"), allow_pickle=False, show_progress=False)

        write_folder_atomically(folder, fill)

    @classmethod
    def load(cls, folder: Path) -> LexicalIndex:
        import bm25s

        size = int((Path(folder) / "size").read_text())
        saved = Path(folder) / "bm25"
        retriever = bm25s.BM25.load(str(saved), allow_pickle=False, show_progress=False) if saved.is_dir() else None
        return cls(retriever, size)
