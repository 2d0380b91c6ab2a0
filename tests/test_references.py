"""Results by reference: a trace too large for a task's reply is left in the site's store and read back.

The local site's workers write to the federation's ``store/results/local``
(a ProxyStore ``FileConnector``); callers read it there directly, or through
the service's ``GET /tpm/v1/requests/{id}/tensors``.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time

import httpx
import pytest
import torch

from tests.service_helpers import ServiceThread
from tpm_fed.interventions import Save
from tpm_fed.protocol.errors import (
    PayloadTooLarge, ReferenceCorrupt, ReferenceExpired, ReferenceNotFound,
)
from tpm_fed.protocol.limits import MAX_PAYLOAD_BYTES
from tpm_fed.protocol.references import CHUNK_BYTES, TensorsReference
from tpm_fed.storage.reference_chunks import get_chunks, put_chunks
from tpm_fed.storage.result_stores import connector_for
from tpm_fed.references.reader import ServiceReader
from tpm_fed.state.schema import references_table

LONG = " ".join(["the stars and the telescope"] * 24)  # ~240 tokens: 2 KB of lm_head output per position


def equal_length_prompts(tokenizer, count: int) -> list[str]:
    """``count`` different prompts of one token count, so a hand-run batch needs no padding."""
    prompts, length = [], len(tokenizer(LONG)["input_ids"])
    words = ["moon", "sun", "comet", "planet", "galaxy", "nebula", "orbit", "quasar"]
    for index in range(count):
        prompt = f"{words[index % 8]} {words[index // 8 % 8]} {words[index // 64 % 8]} " + LONG
        ids = tokenizer(prompt)["input_ids"][:length]
        prompts.append(tokenizer.decode(ids, skip_special_tokens=True))
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) == 1
    return prompts


@pytest.fixture(scope="module")
def big_trace(runtime, reference_model):
    """A 64 MB trace (lm_head output of 136 prompts), answered by reference, and the same by hand."""
    model, tokenizer = reference_model
    prompts = equal_length_prompts(tokenizer, 136)
    result = runtime.trace(prompts, steps=[Save(point="lm_head")]).result()
    ids = torch.tensor([tokenizer(p)["input_ids"] for p in prompts])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return result, logits


def test_a_64_mb_trace_round_trips_by_reference_bit_for_bit(big_trace):
    result, logits = big_trace
    reference = result.tensors_ref
    assert reference is not None and result.tensors_blob == b""
    assert reference.nbytes > 64 * 1024 * 1024 > MAX_PAYLOAD_BYTES
    assert len(reference.keys) == -(-reference.nbytes // CHUNK_BYTES)
    assert reference.store.startswith("file://") and reference.store.endswith("/store/results/local")
    for prompt in range(logits.shape[0]):
        assert torch.equal(torch.from_numpy(result.saved("lm_head.output", prompt)), logits[prompt]), prompt
    # Charged per MB as an inline result is: the bytes made, wherever they wait.
    assert result.usage.activation_bytes == reference.nbytes
    assert result.charge.charged_su > 0


def test_a_small_result_still_travels_inline(runtime):
    result = runtime.trace("The telescope", steps=[Save(point="model.layers.0")]).result()
    assert result.tensors_ref is None and result.tensors_blob
    assert result.usage.activation_bytes == len(result.tensors_blob)


def test_the_service_streams_a_reference_to_its_owner_only(assembly, service, big_trace):
    from tpm_fed.service.app import build_app
    from tpm_fed.service.auth import LocalToken

    result, _ = big_trace
    path = f"/tpm/v1/requests/{result.request_id}/tensors"
    with httpx.Client(base_url=service.url, headers=service.headers, timeout=60) as http:
        streamed = http.get(path)
        assert streamed.status_code == 200
        assert streamed.headers["x-tpm-blake3"] == result.tensors_ref.blake3
        chunks = list(ServiceReader(http)._download(result.request_id, result.tensors_ref))
    stored = b"".join(get_chunks(connector_for(result.tensors_ref.store), result.tensors_ref))
    assert streamed.content == b"".join(chunks) == stored

    token = secrets.token_urlsafe(16)
    with ServiceThread(build_app(assembly, LocalToken(token, "mallory"))) as url:
        foreign = httpx.get(url + path, headers={"Authorization": f"Bearer {token}"})
        unknown = httpx.get(url + "/tpm/v1/requests/no-such-request/tensors",
                            headers={"Authorization": f"Bearer {token}"})
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "NotPermitted"
    assert unknown.status_code == 403  # the same answer as someone else's: ids are not an oracle
    assert streamed.status_code == 200  # the owner read it


def test_a_client_reads_a_reference_through_the_service_when_the_store_is_out_of_reach(http_client, tmp_path):
    result = http_client.trace([LONG] * 40, steps=[Save(point="lm_head")]).result()
    assert result.tensors_ref is not None
    direct = result.tensors["0:lm_head.output"]
    # As a caller on another machine sees it: the store's folder is not there.
    elsewhere = result.model_copy(update={"tensors_ref": result.tensors_ref.model_copy(
        update={"store": "file:///nonexistent/results/local"})})
    elsewhere._reader = result._reader
    assert elsewhere.save_tensors(tmp_path / "t.safetensors") == result.tensors_ref.nbytes
    from safetensors.numpy import load_file

    assert (load_file(tmp_path / "t.safetensors")["0:lm_head.output"] == direct).all()
    # Without a client's reader, a store out of reach is a typed error naming where the tensors are.
    orphan = type(elsewhere).from_wire(elsewhere.to_wire())
    with pytest.raises(ReferenceNotFound, match="cannot read"):
        orphan.tensors


def test_expired_results_are_refused_and_evicted(runtime, service):
    result = runtime.trace([LONG] * 40, steps=[Save(point="lm_head")]).result()
    reference = result.tensors_ref
    connector = connector_for(reference.store)
    past = reference.model_copy(update={"expires_at": time.time() - 1})
    with runtime.log.engine.begin() as db:  # as if the site's retention had passed
        db.execute(references_table.update().where(references_table.c.request_id == result.request_id)
                   .values(reference=past.model_dump_json(), expires_at=past.expires_at))
    answer = httpx.get(f"{service.url}/tpm/v1/requests/{result.request_id}/tensors", headers=service.headers)
    assert answer.status_code == 410 and answer.json()["error"]["code"] == "ReferenceExpired"
    with pytest.raises(ReferenceExpired):
        list(get_chunks(connector, past))

    assert all(connector.exists(connector.new_key().__class__(k)) for k in reference.keys)
    assert runtime.references.evict_expired() >= 1
    assert not any(connector.exists(connector.new_key().__class__(k)) for k in reference.keys)
    with pytest.raises(ReferenceNotFound, match="holds no chunk"):  # its own clock says current: still gone
        list(get_chunks(connector, reference))


def test_a_tampered_reference_reads_nothing_it_was_not_given(big_trace, tmp_path):
    result, _ = big_trace
    reference = result.tensors_ref
    connector = connector_for(reference.store)
    other = put_chunks(connector, b"someone else's tensors", store=reference.store, retention_s=60)
    swapped = reference.model_copy(update={"keys": [other.keys[0], *reference.keys[1:]]})
    with pytest.raises(ReferenceCorrupt):
        list(get_chunks(connector, swapped))
    with pytest.raises(ReferenceNotFound):
        list(get_chunks(connector, reference.model_copy(update={"keys": ["not-a-key"]})))
    with pytest.raises(ValueError):  # a key is a name in the store, never a path out of it
        TensorsReference.model_validate({**reference.to_wire(), "keys": ["../../../etc/passwd"]})
    # A failed read leaves no partial file behind.
    tampered = result.model_copy(update={"tensors_ref": swapped})
    with pytest.raises(ReferenceCorrupt):
        tampered.save_tensors(tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_result_over_the_by_reference_limit_is_refused_before_running(runtime):
    project = runtime.project_for(runtime.owner, None)
    before = runtime.ledger.balances(project)
    # 300 prompts of attention patterns: ~1.1 GB, over the workers' 1 GiB by-reference limit.
    with pytest.raises(PayloadTooLarge, match="returns at most 1,073,741,824"):
        runtime.trace([LONG] * 300, attention_patterns={}).result()
    assert runtime.ledger.balances(project) == before


STREAM_TO_DISK = """
import json, sys
import httpx
from tpm_fed.protocol.references import TensorsReference
from tpm_fed.references.reader import ServiceReader
from tpm_fed.storage.atomic import write_chunks_atomically
def peak_kb():  # this process's own peak (ru_maxrss would start at the forking parent's)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
url, token, request_id, reference, out, whole = sys.argv[1:]
reference = TensorsReference.model_validate_json(reference)
with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
    chunks = ServiceReader(http)._download(request_id, reference)
    before = peak_kb()
    if whole == "1":
        data = b"".join(chunks)
        written = len(data)
    else:
        written = write_chunks_atomically(out, chunks)
    after = peak_kb()
print(json.dumps({"written": written, "growth_kb": after - before}))
"""


def test_streaming_a_large_result_to_disk_keeps_memory_bounded(service, big_trace, tmp_path):
    result, _ = big_trace

    def run(whole: bool) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", STREAM_TO_DISK, service.url, service.token, result.request_id,
             result.tensors_ref.model_dump_json(), str(tmp_path / "t.safetensors"), str(int(whole))],
            capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout)

    streamed, held = run(whole=False), run(whole=True)
    nbytes = result.tensors_ref.nbytes
    assert streamed["written"] == held["written"] == nbytes == (tmp_path / "t.safetensors").stat().st_size
    assert streamed["growth_kb"] * 1024 < 48 * 1024 * 1024, streamed
    assert held["growth_kb"] * 1024 > nbytes * 0.9, held  # the measure sees a whole result held in memory


def test_worker_policy_names_a_result_store(tmp_path):
    from functions.policy import load_policy
    from tpm_fed.protocol.errors import SiteError

    policy = load_policy({"TPM_RESULT_STORE": str(tmp_path), "TPM_INLINE_RESULT_BYTES": "4096"})
    assert policy.result_store == str(tmp_path) and policy.inline_result_bytes == 4096
    assert policy.result_limit == policy.max_reference_bytes
    assert load_policy({}).result_limit == load_policy({}).max_result_bytes  # no store: inline only
    with pytest.raises(SiteError, match="TPM_RESULT_STORE"):
        load_policy({"TPM_RESULT_STORE": "s3://bucket"})


def test_deliver_leaves_large_blobs_in_the_store_and_small_ones_inline(tmp_path):
    from functions.policy import WorkerPolicy
    from functions.references import deliver

    store = tmp_path / "results"
    policy = WorkerPolicy(result_store=f"file://{store}", inline_result_bytes=1000, max_reference_bytes=10_000)
    assert deliver(b"x" * 1000, policy) == {"tensors_blob": b"x" * 1000}
    stored = deliver(b"y" * 5000, policy)
    reference = TensorsReference.from_wire(stored["tensors_ref"])
    assert stored["tensors_blob"] == b"" and reference.nbytes == 5000
    assert b"".join(get_chunks(connector_for(reference.store), reference)) == b"y" * 5000
    assert store.stat().st_mode & 0o777 == 0o700  # other users on the host read nothing
    with pytest.raises(PayloadTooLarge, match="at most 10,000"):
        deliver(b"z" * 10_001, policy)


def test_a_large_embedding_result_comes_by_reference_too(runtime, reference_model):
    from tpm_fed.protocol.requests import EmbeddingRequest

    model, tokenizer = reference_model
    texts = [LONG] * 12  # 12 x ~240 positions x 128 floats: ~1.5 MB, over the 1 MiB inline threshold
    result = runtime.submit(EmbeddingRequest.create("demo-llama", texts=texts, pool="none")).result()
    assert result.tensors_ref is not None and result.tensors_blob == b""
    assert result.usage.activation_bytes == result.tensors_ref.nbytes
    ids = torch.tensor([tokenizer(LONG)["input_ids"]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0]
    assert len(result.outputs) == 12
    assert torch.allclose(torch.from_numpy(result.outputs[11]), hidden, atol=1e-5)
