"""Nobody reads another project's knowledge: every vector-store route answers 403 to a member of another
project (the same answer as for a store that does not exist), and a store an operator published is
readable and searchable by all but changed only by its project.

Defense: :meth:`tpm_fed.stores.registry.StoreRegistry.store`, which every route goes through. Seen failing
with its membership check taken out (every read route then answered 200 to the outsider).
"""

from __future__ import annotations

import httpx
import pytest

from tests.service_helpers import openai_client as official_client
from tests.service_helpers import served
from tests.store_helpers import OUTSIDER, store_home, upload, wait_until_done

ROUTES = [
    ("GET", "/v1/vector_stores/{store}", None),
    ("POST", "/v1/vector_stores/{store}", {"name": "mine now"}),
    ("DELETE", "/v1/vector_stores/{store}", None),
    ("POST", "/v1/vector_stores/{store}/files", {"file_id": "{their_file}"}),
    ("GET", "/v1/vector_stores/{store}/files", None),
    ("GET", "/v1/vector_stores/{store}/files/{file}", None),
    ("POST", "/v1/vector_stores/{store}/files/{file}", {"attributes": {"a": "b"}}),
    ("DELETE", "/v1/vector_stores/{store}/files/{file}", None),
    ("GET", "/v1/vector_stores/{store}/files/{file}/content", None),
    ("POST", "/v1/vector_stores/{store}/file_batches", {"file_ids": ["{their_file}"]}),
    ("GET", "/v1/vector_stores/{store}/file_batches/{batch}", None),
    ("POST", "/v1/vector_stores/{store}/file_batches/{batch}/cancel", None),
    ("GET", "/v1/vector_stores/{store}/file_batches/{batch}/files", None),
    ("POST", "/v1/vector_stores/{store}/search", {"query": "cells"}),
    ("POST", "/v1/vector_stores/{store}@{snapshot}/search", {"query": "cells"}),
    ("GET", "/tpm/v1/vector_stores/{store}/snapshots", None),
    ("GET", "/tpm/v1/vector_stores/{store}/charges", None),
    ("POST", "/v1/responses", {"model": "demo-llama", "input": "cells?", "max_output_tokens": 4,
                               "tools": [{"type": "file_search", "vector_store_ids": ["{store}"]}]}),
]
READS = {"GET", "search", "responses"}


@pytest.fixture(scope="module")
def assembly(tmp_path_factory, demo_model_dir):
    from tpm_fed.service.assembly import ServiceAssembly

    with ServiceAssembly(store_home(tmp_path_factory.mktemp("store-projects"), demo_model_dir)) as assembly:
        yield assembly


@pytest.fixture(scope="module")
def runtime(assembly):
    return assembly.engine


@pytest.fixture(scope="module")
def owner(assembly):
    with served(assembly) as (url, token):
        yield url, token


@pytest.fixture(scope="module")
def outsider(assembly):
    with served(assembly, OUTSIDER) as (url, token):
        yield url, token


@pytest.fixture(scope="module")
def their_store(owner, outsider):
    client = official_client(*owner)
    file_id = upload(client, "cells.txt", "The cell divides when its copy of the genome is complete.")
    store = client.vector_stores.create(name="science only", file_ids=[file_id])
    wait_until_done(client, store.id)
    batch = client.vector_stores.file_batches.create(store.id, file_ids=[file_id])
    wait_until_done(client, store.id)
    snapshot = client.vector_stores.retrieve(store.id).model_extra["tpm"]["snapshot"]
    assert snapshot, list(client.vector_stores.files.list(store.id))
    outsiders_file = upload(official_client(*outsider), "mine.txt", "The outsider's own notes.")
    return {"store": store.id, "file": file_id, "batch": batch.id, "snapshot": snapshot, "their_file": outsiders_file}


def _call(service, method: str, path: str, body, names: dict) -> httpx.Response:
    url, token = service
    path = path.format(**names)
    if body is not None:
        body = _fill(body, names)
    return httpx.request(method, f"{url}{path}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120)


def _fill(value, names):
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, list):
        return [_fill(item, names) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, names) for key, item in value.items()}
    return value


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_another_projects_member_gets_403_on_every_store_route(outsider, their_store, method, path, body):
    answer = _call(outsider, method, path, body, their_store)
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"]["type"] == "permission_error"


def test_their_list_does_not_show_it_and_an_unknown_store_gets_the_same_403(outsider, their_store):
    listed = _call(outsider, "GET", "/v1/vector_stores", None, their_store).json()["data"]
    assert their_store["store"] not in {store["id"] for store in listed}
    unknown = _call(outsider, "GET", "/v1/vector_stores/vs_000000000000000000000000", None, their_store)
    assert unknown.status_code == 403


def test_a_published_store_is_read_by_all_and_changed_only_by_its_project(owner, outsider, operator, their_store):
    names = their_store
    refused = _call(owner, "POST", "/v1/vector_stores/{store}", {"published": True}, names)
    assert refused.status_code == 403 and "operator" in refused.json()["error"]["message"]
    assert _call(operator, "POST", "/v1/vector_stores/{store}", {"published": True}, names).status_code == 200
    try:
        assert _call(outsider, "GET", "/v1/vector_stores/{store}", None, names).status_code == 200
        searched = _call(outsider, "POST", "/v1/vector_stores/{store}/search", {"query": "genome"}, names)
        assert searched.status_code == 200 and searched.json()["data"], searched.text
        assert _call(outsider, "POST", "/v1/vector_stores/{store}", {"name": "taken"}, names).status_code == 403
        assert _call(outsider, "DELETE", "/v1/vector_stores/{store}/files/{file}", None, names).status_code == 403
    finally:
        _call(operator, "POST", "/v1/vector_stores/{store}", {"published": False}, names)
    assert _call(outsider, "GET", "/v1/vector_stores/{store}", None, names).status_code == 403


@pytest.fixture(scope="module")
def operator(assembly):
    """The service as tpm serve runs it for an operator (one named with --operator)."""
    import secrets

    from tests.service_helpers import ServiceThread
    from tpm_fed.service.app import build_app
    from tpm_fed.service.auth import LocalToken

    token = secrets.token_urlsafe(16)
    app = build_app(assembly, LocalToken(token, "the-operator"), operators=frozenset({"the-operator"}))
    with ServiceThread(app) as url:
        yield url, token
