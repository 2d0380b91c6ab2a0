"""Chunking and snapshots without a service: chunks as OpenAI's (token windows with overlap, cut back to the
text), content ids that change exactly when the content does, private files, and no half-written snapshot."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.stores.chunking import TokenCounter, chunk_text, sizes_for
from tpm_fed.stores.protocol import ChunkingStrategy
from tpm_fed.stores.snapshots import ChunkRecord, FileArtifact, SnapshotFiles

TEXT = " ".join(f"Sentence {i} tells how river {i % 7} carries silt to delta {i % 5}." for i in range(120))


@pytest.fixture(scope="module")
def counter():
    from tokenizers import Tokenizer

    from tpm_fed.models.encoder import default_encoder_dir

    return TokenCounter(Tokenizer.from_file(str(default_encoder_dir() / "tokenizer.json")), 256)


def test_chunks_are_token_windows_with_their_overlap_cut_back_to_the_text(counter):
    chunks = chunk_text(TEXT, counter, 100, 40)
    assert len(chunks) > 5
    for chunk in chunks:
        assert chunk.text == TEXT[chunk.start:chunk.end] and counter.count(chunk.text) == chunk.tokens <= 100
    for before, after in zip(chunks, chunks[1:]):
        assert after.start < before.end  # they overlap
        overlap = TEXT[after.start:before.end]
        assert 35 <= counter.count(overlap) <= 45  # by about the overlap asked (a slice re-tokenized may differ by one)
    assert chunks[0].start == 0 and chunks[-1].end == len(TEXT.rstrip())


def test_auto_chunking_is_capped_at_the_encoders_context_and_static_over_it_is_refused(counter):
    assert counter.text_tokens == 254  # MiniLM: 256 positions, [CLS] and [SEP]
    assert sizes_for(ChunkingStrategy(), counter) == (254, 127)
    too_big = ChunkingStrategy(type="static", static={"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400})
    with pytest.raises(InvalidRequest, match="over the store's embedding model's context"):
        sizes_for(too_big, counter)
    with pytest.raises(ValueError, match="half"):
        ChunkingStrategy(type="static", static={"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 101})


def artifact(texts: list[str], attributes: dict | None = None, seed: int = 0) -> FileArtifact:
    vectors = np.random.default_rng(seed).standard_normal((len(texts), 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return FileArtifact([ChunkRecord("file-a", "a.txt", i, text, 0, len(text), attributes or {})
                         for i, text in enumerate(texts)], vectors)


def test_a_snapshots_id_changes_exactly_when_its_content_does(tmp_path):
    files = SnapshotFiles(tmp_path / "stores")
    first = files.build("vs_1", "enc", "v1", [artifact(["alpha", "beta"])])
    assert files.build("vs_1", "enc", "v1", [artifact(["alpha", "beta"])]).snapshot_id == first.snapshot_id
    changed = [files.build("vs_1", "enc", "v1", [artifact(["alpha", "beta!"])]),
               files.build("vs_1", "enc", "v1", [artifact(["alpha", "beta"], {"year": 2024})]),
               files.build("vs_1", "enc", "v2", [artifact(["alpha", "beta"])]),
               files.build("vs_1", "enc", "v1", [artifact(["alpha", "beta"], seed=1)])]
    assert len({first.snapshot_id, *(s.snapshot_id for s in changed)}) == 5
    loaded = files.load("vs_1", first.snapshot_id)
    assert [c.text for c in loaded.chunks] == ["alpha", "beta"] and np.array_equal(loaded.vectors, first.vectors)


def test_a_snapshots_files_are_private_whatever_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        files = SnapshotFiles(tmp_path / "stores")
        built = files.build("vs_1", "enc", "v1", [artifact(["alpha", "beta"])])
        files.write_artifact("vs_1", "key", artifact(["gamma"]))
    finally:
        os.umask(previous)
    paths = [tmp_path / "stores", *(tmp_path / "stores").rglob("*")]
    assert len(paths) > 6 and built.snapshot_id
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_a_snapshot_that_fails_to_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import tpm_fed.stores.lexical as lexical

    files = SnapshotFiles(tmp_path / "stores")
    files.build("vs_1", "enc", "v1", [artifact(["alpha"])])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def broken_save(self, folder):
        raise OSError("disk full")

    monkeypatch.setattr(lexical.LexicalIndex, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        files.build("vs_1", "enc", "v1", [artifact(["alpha", "beta"])])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def one_page_pdf(text: str) -> bytes:
    """A minimal valid PDF of one page showing ``text`` (Helvetica), with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


def test_documents_give_their_text_by_kind():
    from tpm_fed.stores.documents import InvalidFile, UnsupportedFile, text_of

    assert text_of(one_page_pdf("Run 7 measured 7341 hertz."), "run.pdf") == "Run 7 measured 7341 hertz."
    assert text_of(b'{"text": "one"}\n\n{"other": 2}\n', "lines.jsonl") == 'one\n\n{"other": 2}'
    assert text_of("# Título\n\nçà".encode(), "notes.MD") == "# Título\n\nçà"
    with pytest.raises(InvalidFile, match="no text"):
        text_of(one_page_pdf(""), "blank.pdf")
    with pytest.raises(UnsupportedFile, match="not .html"):
        text_of(b"<p>hi</p>", "page.html")


def test_filtered_and_unfiltered_hits_equal_brute_force(tmp_path):
    from tpm_fed.stores.filters import matches
    from tpm_fed.stores.protocol import CompoundFilter
    from tpm_fed.stores.search import search_snapshot

    rng = np.random.default_rng(3)
    artifacts = []
    for number in range(20):  # 20 files of 30 chunks, each file with its own attributes
        vectors = rng.standard_normal((30, 16)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        attributes = {"year": 2000 + number, "lab": "ab"[number % 2]}
        artifacts.append(FileArtifact([ChunkRecord(f"file-{number}", f"{number}.txt", i, f"chunk {number}.{i}", 0, 1,
                                                   attributes) for i in range(30)], vectors))
    snapshot = SnapshotFiles(tmp_path / "stores").build("vs_1", "enc", "v1", artifacts)
    chunks = [chunk for a in artifacts for chunk in a.chunks]
    query = rng.standard_normal(16).astype(np.float32)
    query /= np.linalg.norm(query)
    condition = CompoundFilter.model_validate({"type": "and", "filters": [
        {"key": "year", "type": "gte", "value": 2010}, {"key": "lab", "type": "in", "value": ["b"]}]})
    for given in (None, condition):
        kept = [i for i, chunk in enumerate(chunks) if matches(given, chunk.attributes)]
        scores = snapshot.vectors[kept] @ query
        expected = [chunks[kept[i]].text for i in np.argsort(-scores, kind="stable")[:7]]
        assert [hit.chunk.text for hit in search_snapshot(snapshot, query, "", 7, given)] == expected
    assert len([i for i, c in enumerate(chunks) if matches(condition, c.attributes)]) == 5 * 30
