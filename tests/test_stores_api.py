"""Vector stores through the official ``openai`` client against a real service: create, attach, ingest,
search (the hits equal a brute-force cosine search over the same embeddings from ``/v1/embeddings``),
answer with ``file_search``, knowledge updates across snapshots, and the store's charges.

The demo language model cannot really answer questions, so the knowledge tests assert on what it was
given: the cited chunk and the exact prompt (the ``tpm`` object carries it), with the store and without.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.conftest import Service
from tests.service_helpers import openai_client as official_client
from tests.service_helpers import served
from tests.store_helpers import store_home, unit, upload, wait_until_done
from tpm_fed.home import DEMO_MODEL_NAME
from tpm_fed.state.schema import MICRO

PAPERS = {
    "rivers.md": "# Rivers\n\nRivers carry silt to the sea. The delta grows each flood season as the "
                 "current slows and the sand settles on the banks.\n\nMountains feed the rivers with snow melt "
                 "in spring, and the water runs cold and fast through the valleys.",
    "cells.txt": "The cell divides when its copy of the genome is complete. Each daughter cell takes one copy "
                 "of every chromosome, and the membrane pinches in the middle until two cells stand apart.",
    "stars.jsonl": '{"text": "The telescope sees light that left the star long ago."}\n'
                   '{"text": "A star burns hydrogen into helium in its core for billions of years."}\n',
}

FACT_V1 = "The Quorvath beacon on Tessaly moon hums at 7341 hertz."
FACT_V2 = "The Quorvath beacon on Tessaly moon hums at 9912 hertz."
SMALL_CHUNKS = {"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 0}}


@pytest.fixture(scope="module")
def store_assembly(tmp_path_factory, demo_model_dir):
    from tpm_fed.service.assembly import ServiceAssembly

    with ServiceAssembly(store_home(tmp_path_factory.mktemp("store-home"), demo_model_dir)) as assembly:
        yield assembly


@pytest.fixture(scope="module")
def store_runtime(store_assembly):
    return store_assembly.engine


@pytest.fixture(scope="module")
def store_service(store_assembly):
    with served(store_assembly) as (url, token):
        yield Service(url, token, None)


@pytest.fixture(scope="module")
def client(store_service):
    return official_client(store_service.url, store_service.token)


@pytest.fixture(scope="module")
def papers_store(client):
    file_ids = {name: upload(client, name, text) for name, text in PAPERS.items()}
    store = client.vector_stores.create(name="papers", file_ids=list(file_ids.values()),
                                        chunking_strategy=SMALL_CHUNKS)
    done = wait_until_done(client, store.id)
    assert done.status == "completed" and done.file_counts.completed == 3, done.file_counts
    return store.id, file_ids


def brute_force(client, store_id: str, file_ids: dict[str, str], model: str, query: str) -> list[tuple[str, float]]:
    """Every chunk of the store (its files' parsed content) embedded alone through /v1/embeddings, ranked by
    cosine with the query embedded the same way: (chunk text, score), best first."""
    chunks = [part.text for file_id in file_ids.values()
              for part in client.vector_stores.files.content(file_id, vector_store_id=store_id)]
    vectors = unit([row.embedding for row in client.embeddings.create(model=model, input=chunks).data])
    query_vector = unit(client.embeddings.create(model=model, input=[query]).data[0].embedding)
    scores = vectors @ query_vector
    return [(chunks[i], float(scores[i])) for i in np.argsort(-scores, kind="stable")]


def test_search_returns_the_chunks_a_brute_force_cosine_search_returns(client, papers_store):
    store_id, file_ids = papers_store
    store = client.vector_stores.retrieve(store_id)
    model = store.model_extra["tpm"]["embedding_model"]
    query = "Where does the silt of the river go?"
    page = client.vector_stores.search(store_id, query=query, max_num_results=4)
    hits = list(page)
    expected = brute_force(client, store_id, file_ids, model, query)[:4]
    assert [hit.content[0].text for hit in hits] == [text for text, _ in expected]
    assert [hit.score for hit in hits] == pytest.approx([score for _, score in expected], abs=1e-4)
    by_id = {file_id: name for name, file_id in file_ids.items()}
    assert all(hit.filename == by_id[hit.file_id] for hit in hits)


def test_every_search_names_its_snapshot_and_model_version_and_a_pin_returns_the_same_hits(
        client, papers_store, store_service):
    store_id, _ = papers_store
    query = {"query": "How does a cell divide?", "max_num_results": 3}
    first = _post(store_service, f"/v1/vector_stores/{store_id}/search", query)
    facts = first["tpm"]
    assert facts["snapshot"] == client.vector_stores.retrieve(store_id).model_extra["tpm"]["snapshot"]
    assert len(facts["model_version"]) == 16 and facts["ref"] == f"{store_id}@{facts['snapshot']}"
    pinned = _post(store_service, f"/v1/vector_stores/{facts['ref']}/search", query)
    assert pinned["data"] == first["data"]


def test_knowledge_update_cites_the_fact_with_the_store_and_a_pinned_old_snapshot_keeps_the_old_chunk(
        client, store_service):
    old_file = upload(client, "beacon.txt", FACT_V1)
    store = client.vector_stores.create(name="beacons", file_ids=[old_file], chunking_strategy=SMALL_CHUNKS)
    assert wait_until_done(client, store.id).file_counts.completed == 1
    question = "At what frequency does the Quorvath beacon hum?"

    with_store = client.responses.create(model=DEMO_MODEL_NAME, input=question, max_output_tokens=8,
                                         tools=[{"type": "file_search", "vector_store_ids": [store.id]}],
                                         include=["file_search_call.results"])
    call, message = with_store.output
    assert call.type == "file_search_call" and call.results[0].text == FACT_V1
    cited = message.content[0].annotations[0]
    assert cited.file_id == old_file and cited.filename == "beacon.txt"
    assert cited.model_extra["tpm"]["text"] == FACT_V1
    assert FACT_V1 in with_store.model_extra["tpm"]["prompt"]
    old_snapshot = with_store.model_extra["tpm"]["searches"][0]["snapshot"]

    without = client.responses.create(model=DEMO_MODEL_NAME, input=question, max_output_tokens=8)
    assert "7341" not in without.model_extra["tpm"]["prompt"]
    assert [item.type for item in without.output] == ["message"] and not without.output[0].content[0].annotations

    # Replace the file: the store moves to a snapshot with the new fact; the old one, pinned, keeps the old.
    new_file = upload(client, "beacon.txt", FACT_V2)
    client.vector_stores.files.delete(old_file, vector_store_id=store.id)
    client.vector_stores.files.create(store.id, file_id=new_file)
    assert wait_until_done(client, store.id).file_counts.completed == 1
    updated = client.responses.create(model=DEMO_MODEL_NAME, input=question, max_output_tokens=8,
                                      tools=[{"type": "file_search", "vector_store_ids": [store.id]}])
    assert updated.output[1].content[0].annotations[0].model_extra["tpm"]["text"] == FACT_V2
    assert updated.model_extra["tpm"]["searches"][0]["snapshot"] != old_snapshot
    pinned = client.vector_stores.search(f"{store.id}@{old_snapshot}", query=question)
    assert [hit.content[0].text for hit in pinned] == [FACT_V1]
    snapshots = _get(store_service, f"/tpm/v1/vector_stores/{store.id}/snapshots")["data"]
    assert old_snapshot in {s["id"] for s in snapshots} and sum(s["current"] for s in snapshots) == 1


def test_a_stores_charges_are_the_sum_of_its_embedding_and_search_charges(client, store_service, store_runtime, store_assembly,
                                                                         demo_model_dir, tmp_path):
    from tpm_fed.stores.service import SEARCH_USU

    file_id = upload(client, "cells.txt", PAPERS["cells.txt"])
    store = client.vector_stores.create(name="charged", file_ids=[file_id], chunking_strategy=SMALL_CHUNKS)
    wait_until_done(client, store.id)
    for query in ("cell", "genome copy", "membrane"):
        client.vector_stores.search(store.id, query=query)
    charges = _get(store_service, f"/tpm/v1/vector_stores/{store.id}/charges")
    parts = charges["by_cause"]
    assert parts["search"]["requests"] == 3 and parts["search"]["charged_usu"] == 3 * SEARCH_USU
    assert parts["query"]["requests"] == 3 and parts["ingest"]["requests"] >= 1
    # The ledger's own rows for those requests: embed rows at the embedding price, search rows at its price.
    ledger_rows = {row.request_id: row for row in store_runtime.ledger.statement("science")}
    ids = store_assembly.stores.registry
    from sqlalchemy import select

    from tpm_fed.stores.tables import store_charges_table as k

    with store_runtime.ledger.engine.connect() as db:
        mine = db.execute(select(k.c.request_id, k.c.what).where(k.c.store_id == store.id)).all()
    assert ids is not None and len(mine) == sum(part["requests"] for part in parts.values())
    embed_usu = sum(ledger_rows[rid].charged_usu for rid, what in mine if what != "search")
    search_usu = sum(ledger_rows[rid].charged_usu for rid, what in mine if what == "search")
    assert embed_usu > 0 and {ledger_rows[rid].kind for rid, what in mine if what != "search"} <= {"embed", "encode"}
    assert charges["total_su"] * MICRO == pytest.approx(embed_usu + search_usu)


def _post(service: Service, path: str, body: dict) -> dict:
    answer = httpx.post(f"{service.url}{path}", json=body, headers=service.headers, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _get(service: Service, path: str) -> dict:
    answer = httpx.get(f"{service.url}{path}", headers=service.headers, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_hybrid_ranking_options_fuse_bm25_with_the_dense_ranking(client, papers_store, store_service):
    store_id, _ = papers_store
    query = {"query": "hydrogen helium", "max_num_results": 3}
    dense = _post(store_service, f"/v1/vector_stores/{store_id}/search", query)["data"]
    dense_only = _post(store_service, f"/v1/vector_stores/{store_id}/search",
                       {**query, "ranking_options": {"hybrid_search": {"embedding_weight": 1, "text_weight": 0}}})["data"]
    assert [hit["content"] for hit in dense_only] == [hit["content"] for hit in dense]
    text_only = _post(store_service, f"/v1/vector_stores/{store_id}/search",
                      {**query, "ranking_options": {"hybrid_search": {"embedding_weight": 0, "text_weight": 1}}})["data"]
    assert "hydrogen into helium" in text_only[0]["content"][0]["text"] and text_only[0]["score"] == pytest.approx(1.0)
    both_zero = httpx.post(f"{store_service.url}/v1/vector_stores/{store_id}/search", headers=store_service.headers,
                           json={**query, "ranking_options": {"hybrid_search": {"embedding_weight": 0, "text_weight": 0}}})
    assert both_zero.status_code == 400


def test_chat_completions_take_file_search_as_a_tpm_extension(client):
    file_id = upload(client, "beacon.txt", FACT_V1)
    store = client.vector_stores.create(name="chat-beacons", file_ids=[file_id], chunking_strategy=SMALL_CHUNKS)
    wait_until_done(client, store.id)
    messages = [{"role": "user", "content": "At what frequency does the Quorvath beacon hum?"}]
    answered = client.chat.completions.create(model="demo-chat", messages=messages, max_tokens=6,
                                              extra_body={"file_search": {"vector_store_ids": [store.id]}})
    facts = answered.model_extra["tpm"]
    assert facts["citations"][0]["file_id"] == file_id and facts["citations"][0]["tpm"]["text"] == FACT_V1
    assert f"<|system|>Answer using the numbered sources" in facts["prompt"] and FACT_V1 in facts["prompt"]
    assert facts["searches"][0]["snapshot"] == client.vector_stores.retrieve(store.id).model_extra["tpm"]["snapshot"]
    plain = client.chat.completions.create(model="demo-chat", messages=messages, max_tokens=6)
    assert "citations" not in plain.model_extra["tpm"]


def test_a_streamed_response_gives_openais_events_and_the_same_citations(client):
    file_id = upload(client, "beacon.txt", FACT_V1)
    store = client.vector_stores.create(name="streamed", file_ids=[file_id], chunking_strategy=SMALL_CHUNKS)
    wait_until_done(client, store.id)
    events = list(client.responses.create(model=DEMO_MODEL_NAME, input="What hums at Tessaly?", max_output_tokens=6,
                                          tools=[{"type": "file_search", "vector_store_ids": [store.id]}],
                                          stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.file_search_call.completed" in kinds and "response.output_text.annotation.added" in kinds
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert final.output[1].content[0].text == text
    assert final.output[1].content[0].annotations[0].file_id == file_id
