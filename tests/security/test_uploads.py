"""Uploads are for project members, bounded per identity, expire, and are never held whole in memory.

Issue 24, defect 8: an identity in no project uploaded a 96 MiB, 50,000-line file; the service's
memory rose 517 MB (the body read whole, decoded, split) and the file never expired. Through the
official ``openai`` client against the real service: a non-member is refused (403) before a byte is
stored; an upload past the caller's quota is a 413 that stores nothing; ``expires_after`` is taken
(and a default expiry given), and an expired file is refused and swept; a 20 MiB upload's peak
traced memory in the service stays a small fraction of the file.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
import tracemalloc
from typing import Any

import openai
import pytest
from sqlalchemy import func, select, update

from tests.batch_helpers import batch_home, jsonl, mixed_lines
from tests.service_helpers import openai_client, served
from tpm_fed.batches.protocol import FILE_EXPIRY_S, UPLOAD_QUOTA_BYTES
from tpm_fed.batches.store import BatchStore
from tpm_fed.batches.tables import batch_file_parts_table, batch_files_table
from tpm_fed.home import DEMO_MODEL_NAME

STRANGER = "no-project@example.org"


@pytest.fixture(scope="module")
def assembly(tmp_path_factory, demo_model_dir):
    from tpm_fed.service.assembly import ServiceAssembly

    with ServiceAssembly(batch_home(tmp_path_factory.mktemp("uploads"), demo_model_dir)) as assembly:
        yield assembly


@pytest.fixture(scope="module")
def runtime(assembly):
    return assembly.engine


@pytest.fixture(scope="module")
def member(assembly):
    with served(assembly) as (url, token):
        yield openai_client(url, token)


@pytest.fixture(scope="module")
def stranger(assembly, member):  # member first: the runtime's batch routes and store are made once
    with served(assembly, STRANGER) as (url, token):
        yield openai_client(url, token)


def _store(assembly) -> BatchStore:
    return assembly.batches.store


def _stored(runtime, owner: str | None = None) -> tuple[int, int]:
    """(file rows, bytes in parts) in the database, of ``owner`` or of everyone."""
    f, p = batch_files_table.c, batch_file_parts_table.c
    with runtime.ledger.engine.connect() as db:
        rows = db.execute(select(func.count()).where(*([f.owner == owner] if owner else []))).scalar_one()
        parts = db.execute(select(func.coalesce(func.sum(func.length(p.content)), 0))).scalar_one()
    return rows, parts


def test_an_identity_in_no_project_cannot_upload(runtime, stranger):
    before = _stored(runtime)
    with pytest.raises(openai.PermissionDeniedError, match="not a member of any project"):
        stranger.files.create(file=("b.jsonl", io.BytesIO(jsonl(mixed_lines(3)))), purpose="batch")
    assert _stored(runtime) == before and _stored(runtime, STRANGER)[0] == 0


def test_an_upload_past_the_quota_is_refused_and_stores_nothing(assembly, runtime, member):
    store = _store(assembly)
    first = member.files.create(file=("a.jsonl", io.BytesIO(jsonl(mixed_lines(20)))), purpose="batch")
    store.upload_quota_bytes = first.bytes + 1000  # the operator's setting, small for the test
    try:
        before = _stored(runtime)
        with pytest.raises(openai.APIStatusError, match="quota") as refused:
            member.files.create(file=("b.jsonl", io.BytesIO(jsonl(mixed_lines(20)))), purpose="batch")
        assert refused.value.status_code == 413
        assert _stored(runtime) == before
        member.files.delete(first.id)  # deleting frees the room
        again = member.files.create(file=("b.jsonl", io.BytesIO(jsonl(mixed_lines(20)))), purpose="batch")
        assert again.bytes == first.bytes
        member.files.delete(again.id)
    finally:
        store.upload_quota_bytes = UPLOAD_QUOTA_BYTES


def test_the_quota_is_an_operator_setting(runtime, monkeypatch):
    monkeypatch.setenv("TPM_UPLOAD_QUOTA_BYTES", "12345")
    assert BatchStore(runtime.ledger.engine).upload_quota_bytes == 12345
    monkeypatch.delenv("TPM_UPLOAD_QUOTA_BYTES")
    assert BatchStore(runtime.ledger.engine).upload_quota_bytes == UPLOAD_QUOTA_BYTES


def test_files_expire_and_an_expired_file_is_refused_then_swept(assembly, runtime, member):
    default = member.files.create(file=("d.jsonl", io.BytesIO(jsonl(mixed_lines(2)))), purpose="batch")
    assert default.expires_at == pytest.approx(default.created_at + FILE_EXPIRY_S, abs=2)
    hour = member.files.create(file=("h.jsonl", io.BytesIO(jsonl(mixed_lines(2)))), purpose="batch",
                               expires_after={"anchor": "created_at", "seconds": 3600})
    assert hour.expires_at == pytest.approx(hour.created_at + 3600, abs=2)
    assert member.files.retrieve(hour.id).expires_at == hour.expires_at
    with pytest.raises(openai.BadRequestError, match="expires_after.seconds"):
        member.files.create(file=("s.jsonl", io.BytesIO(jsonl(mixed_lines(2)))), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 5})

    # An hour passes for this file (its expiry moved into the past, as the clock would).
    with runtime.ledger.engine.begin() as db:
        db.execute(update(batch_files_table).where(batch_files_table.c.file_id == hour.id)
                   .values(expires_at=time.time() - 1))
    assert hour.id not in [f.id for f in member.files.list()]
    for attempt in (lambda: member.files.retrieve(hour.id), lambda: member.files.content(hour.id),
                    lambda: member.batches.create(input_file_id=hour.id, endpoint="/v1/completions",
                                                  completion_window="24h")):
        with pytest.raises(openai.PermissionDeniedError):
            attempt()
    assert _store(assembly).sweep_expired_files() == 0  # already swept when it was refused
    with runtime.ledger.engine.connect() as db:
        assert db.execute(select(func.count()).where(batch_file_parts_table.c.file_id == hour.id)).scalar_one() == 0
    assert member.files.content(default.id).content == jsonl(mixed_lines(2))  # the unexpired one is intact
    member.files.delete(default.id)


def _big_file(target_bytes: int) -> tuple[Any, int]:
    filler = "the telescope sees far " * 24  # ~650 bytes a line: 20 MiB in fewer than 50,000 lines
    out = tempfile.TemporaryFile()
    index = 0
    while out.tell() < target_bytes:
        out.write((json.dumps({"custom_id": f"l{index}", "method": "POST", "url": "/v1/completions",
                               "body": {"model": DEMO_MODEL_NAME, "prompt": f"{filler}{index}",
                                        "max_tokens": 1}}) + "\n").encode())
        index += 1
    size = out.tell()
    out.seek(0)
    return out, size


def test_a_large_upload_is_never_held_whole_in_memory(runtime, member):
    source, size = _big_file(20 * 1024 * 1024)
    assert size >= 20 * 1024 * 1024
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        uploaded = member.files.create(file=("big.jsonl", source), purpose="batch")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert uploaded.bytes == size
    print(f"upload of {size / 2**20:.1f} MiB: peak traced memory {peak / 2**20:.2f} MiB")
    # Client and service both in this process: together they held at most a quarter of the file at once
    # (before: 109.5 MiB, five times the file: read whole, decoded, split).
    assert peak < size / 4, f"peak traced memory {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB upload"
    source.seek(0)
    assert member.files.content(uploaded.id).content == source.read()  # stored whole, byte for byte
    member.files.delete(uploaded.id)
