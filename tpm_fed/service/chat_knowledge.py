"""``file_search`` on ``/v1/chat/completions``: a tpm-fed extension, the Responses API's tool on the chat route.

A body with ``"file_search": {"vector_store_ids": [...], "max_num_results": N, "filters": ..., "ranking_options":
...}`` has its last user message searched in those stores; the best hits go to the model as a system message
(the template of :mod:`tpm_fed.stores.answers`, without its question lines: the conversation follows it), as
many as fit the model's context beside the answer, and the answer's ``tpm`` object cites every source given
(file id, filename, chunk, snapshot) beside the searches made and the exact prompt.
"""

from __future__ import annotations

from typing import Any

from tpm_fed.protocol.errors import ContextLengthExceeded, InvalidRequest
from tpm_fed.stores.answers import INSTRUCTION, Source, citation, source_block
from tpm_fed.stores.service import search_facts

def with_knowledge(serving: Any, body: Any, identity: str, operator: bool = False) -> tuple[Any, dict[str, Any]]:
    """``body`` with the stores' best hits as a leading system message, and the facts for its ``tpm`` object.

    Raises:
        InvalidRequest: No user message, or ``stream`` (answers with knowledge come whole).
        NotPermitted: A store the caller may not read.
        ContextLengthExceeded: The conversation alone does not fit beside the answer.
    """
    search = body.file_search
    if body.stream:
        raise InvalidRequest("file_search: a chat answer with knowledge comes whole (stream: false)")
    users = [message for message in body.messages if message.role == "user"]
    if not users:
        raise InvalidRequest("file_search: no user message to search for")
    question = users[-1].content if isinstance(users[-1].content, str) else str(users[-1].content)
    stores = serving.stores
    caller = stores.caller(identity, operator)
    found: list[tuple[Any, str]] = []
    searches = []
    for ref in search.vector_store_ids:
        hits, snapshot, charges = stores.find(ref, caller, question, search.max_num_results, search.filters,
                                              search.ranking_options, body.project)
        searches.append(search_facts(snapshot, charges))
        found += [(hit, snapshot.snapshot_id) for hit in hits] if snapshot is not None else []
    found = sorted(found, key=lambda pair: -pair[0].score)[:search.max_num_results]
    room = serving.runtime.catalog.resolve_name(body.model).context_length - body.max_new_tokens()
    given: list[Source] = []
    for hit, snapshot in found:  # best first, while the rendered prompt still fits
        trial = given + [Source(len(given) + 1, hit, snapshot)]
        if _tokens(serving, _with_sources(body, trial)) <= room:
            given = trial
    answered = _with_sources(body, given)
    if _tokens(serving, answered) > room:
        raise ContextLengthExceeded(f"the conversation takes over the {room} tokens the model has beside its answer")
    facts = {"citations": [citation(source, source.number - 1) for source in given], "searches": searches,
             "prompt": serving.request_for(answered).prompts[0]}
    return answered, facts


def _with_sources(body: Any, sources: list[Source]) -> Any:
    if not sources:
        return body.model_copy(update={"file_search": None})
    text = INSTRUCTION + "\n" + "".join(source_block(s.number, s.hit) for s in sources)
    message = body.messages[0].model_copy(update={"role": "system", "content": text, "name": None})
    return body.model_copy(update={"messages": [message, *body.messages], "file_search": None})


def _tokens(serving: Any, body: Any) -> int:
    from tpm_fed.service.serving_responses import _counter

    spec = serving.runtime.catalog.resolve_name(body.model).spec
    return _counter(serving.runtime, spec)(serving.request_for(body).prompts[0])
