"""A batch's quote: the sum of its lines' quotes, and the check that the project can pay it.

Each line is priced by the broker exactly as a request sent alone
(:meth:`tpm_fed.service.runtime.Runtime.quotes`: the edge checks per line, one
decision for the lines that place alike), so the edge checks a line
would meet when it runs (unknown model, a project the caller is not in, a
prompt longer than the model) are met here, before the batch exists, and are
reported by line. Nothing is reserved or run.
"""

from __future__ import annotations

import math
from typing import Any

from tpm_fed.batches.engine_interface import BatchEngine
from tpm_fed.batches.jsonl import BatchFileInvalid
from tpm_fed.batches.lines import NATIVE_URL, LineRoutes, charging
from tpm_fed.ledger import Metered, price_usu
from tpm_fed.batches.protocol import BatchInputLine, BatchQuote
from tpm_fed.protocol.errors import InsufficientBalance, InvalidRequest, TpmError
from tpm_fed.protocol.quotes import Quote
from tpm_fed.protocol.requests import ServingRequest
from tpm_fed.state.schema import MICRO


def quote_batch(runtime: BatchEngine, routes: LineRoutes, identity: str, project: str,
                batch_lines: list[BatchInputLine], window: int) -> BatchQuote:
    """Price every line for ``project`` and add them up (see :class:`BatchQuote`).

    Raises:
        BatchFileInvalid: Lines the service would refuse (all named), when they are refused for different
            reasons; the lines' own error type (``UnknownModel``, ``NotPermitted``...) when all share one.
    """
    built: list[ServingRequest | TpmError] = []
    for line in batch_lines:
        try:
            built.append(_request(routes, project, line.url, line.body))
        except TpmError as error:
            built.append(error)
    requests = [request for request in built if not isinstance(request, TpmError)]
    # One pass: lines that place alike share the broker's decision (a batch's lines mostly do).
    priced = iter(runtime.quotes(requests, identity))
    quotes: list[Quote] = []
    steps: list[int] = []  # generation steps per line (its max tokens; one forward pass for the rest)
    problems: list[tuple[int, str]] = []
    kinds: set[type] = set()
    for number, (line, request) in enumerate(zip(batch_lines, built, strict=True), start=1):
        outcome = request if isinstance(request, TpmError) else next(priced)
        if isinstance(outcome, TpmError):
            problems.append((number, f"{line.custom_id}: {type(outcome).__name__}: {outcome}"))
            kinds.add(type(outcome))
            continue
        quotes.append(outcome)
        steps.append(max(1, getattr(request, "max_new_tokens", 0) or 1))
    if problems:
        refusal = BatchFileInvalid(problems)
        if len(kinds) == 1 and not issubclass(only := kinds.pop(), InvalidRequest):
            try:
                same = only(str(refusal))  # one cause for all: its own status (403, 404, 429...)
            except TypeError:  # an error type that needs more than a message
                raise refusal from None
            raise same
        raise refusal
    per_site = _bound_per_site(runtime, quotes)
    available = {b.site: b.available_usu / MICRO for b in runtime.ledger.balances(project) if b.site in per_site}
    return BatchQuote(
        project=project, lines=len(quotes), max_su=sum(per_site.values()),
        expected_su=sum(q.expected_su for q in quotes), max_su_per_site=per_site, available_su=available,
        estimated_s=_estimated_s(runtime, quotes, steps, window),
    )


def _estimated_s(runtime: BatchEngine, quotes: list[Quote], steps: list[int], window: int) -> float:
    """When the batch would end: its sites work at once, each through its lines in waves.

    A site whose replica has a measured pace (:class:`tpm_fed.broker.pace.StepModel`) runs its lines
    ``rows`` at a time (the runner's window, the site's task size), each wave as long as its longest
    line at that replica's step time for that many rows. It may scale out: with free replica slots
    there, the lines spread over more replicas (each further one after the site's cold start) when
    that ends sooner, as the broker starts a replica when the wait for the warm ones is longer
    than a start. A replica with no pace yet is estimated from the lines' own quotes: the first
    wave's slowest, then the rest of the waves at the fastest line's pace.
    """
    by_site: dict[str, list[int]] = {}
    for index, quote in enumerate(quotes):
        by_site.setdefault(quote.site, []).append(index)
    ends = []
    for site, indexes in by_site.items():
        chosen, config = quotes[indexes[0]], runtime.federation.site(site)
        pace = runtime.broker.registry.pace(chosen.replica) if chosen.replica is not None else None
        rows = min(window, config.max_batch_requests, len(indexes))
        if pace is None or not pace.known:
            estimates = [quotes[i].estimated_s for i in indexes]
            ends.append(max(estimates[:rows]) + (math.ceil(len(indexes) / rows) - 1) * min(estimates))
            continue
        warm = sum(1 for r in runtime.broker.registry.of_model(chosen.model, chosen.version)
                   if r.site == site and r.state == "warm")
        site_steps = [steps[i] for i in indexes]
        ends.append(min(_spread_s(pace, site_steps, rows, replicas, config.cold_start_s if replicas > warm else 0.0)
                        for replicas in range(1, max(1, config.capacity.max_replicas, warm) + 1)))
    return round(max(ends), 3)


def _spread_s(pace: Any, steps: list[int], rows: int, replicas: int, start_s: float) -> float:
    """Seconds for ``replicas`` replicas of one pace to run the lines dealt out in turn, after ``start_s``."""
    shares = [steps[i::replicas] for i in range(replicas)]
    return start_s + max(pace.batch_s(share, min(rows, len(share))) for share in shares if share)


def _bound_per_site(runtime: BatchEngine, quotes: list[Quote]) -> dict[str, float]:
    """The most the lines can be charged, per site they would be placed on.

    A line's own quote bounds it alone, a cold start included (its replica may be
    gone when it is sent). Lines of one batch share replicas: at a site, at most
    as many cold starts are charged as replicas may start there (the site's
    ``max_replicas``, or the lines' count if fewer), so each line counts without
    its cold start, and the site's possible cold starts are added once.
    """
    prices = runtime.federation.prices
    per_site: dict[str, float] = {}
    cold: dict[str, float] = {}  # site -> the dearest cold start of its lines
    counts: dict[str, int] = {}
    for quote in quotes:
        # A start over several nodes starts each one (the quote's max_su counts them all).
        start = Metered(cold_start=True, nodes=quote.nodes)
        cold_su = 0.0 if quote.free else price_usu(prices.of(quote.kind), start) / MICRO
        per_site[quote.site] = per_site.get(quote.site, 0.0) + quote.max_su - cold_su
        cold[quote.site] = max(cold.get(quote.site, 0.0), cold_su)
        counts[quote.site] = counts.get(quote.site, 0) + 1
    for site, lines_there in counts.items():
        starts = min(lines_there, runtime.federation.site(site).capacity.max_replicas)
        per_site[site] += starts * cold[site]
    return per_site


def quote_line(runtime: BatchEngine, routes: LineRoutes, identity: str, project: str | None, url: str,
               body: dict[str, Any]) -> Quote:
    """One line's (or one request's) quote, as its route would build the request."""
    return runtime.quote(_request(routes, project, url, body), identity)


def _request(routes: LineRoutes, project: str | None, url: str, body: dict[str, Any]) -> ServingRequest:
    return routes.request_for(url, charging(routes.parse_body(url, body), project))


def check_balance(quote: BatchQuote) -> None:
    """Refuse a batch its project cannot pay at its bound (per site, as the ledger reserves).

    Raises:
        InsufficientBalance: With the quote in the message (HTTP 429 ``insufficient_quota``).
    """
    short = {site: (need, quote.available_su.get(site, 0.0)) for site, need in quote.max_su_per_site.items()
             if need > quote.available_su.get(site, 0.0) + 1e-9}
    if short:
        where = "; ".join(f"on {site} it needs up to {need:.6f} SU and {have:.6f} SU are available"
                          for site, (need, have) in sorted(short.items()))
        raise InsufficientBalance(
            f"project {quote.project!r} cannot pay for this batch at its bound: {where} "
            f"(quote: {quote.lines} lines, at most {quote.max_su:.6f} SU, {quote.expected_su:.6f} SU as placed now, "
            f"done in about {quote.estimated_s:.0f} s). Nothing was run or charged.")


def guess_url(body: dict[str, Any]) -> str:
    """The route a lone request body is for, from its fields (``POST /v1/quotes`` without ``url``)."""
    if "messages" in body:
        return "/v1/chat/completions"
    if "prompt" in body:
        return "/v1/completions"
    if "input" in body:
        return "/v1/embeddings"
    if "kind" in body or "prompts" in body:
        return NATIVE_URL
    raise InvalidRequest("url: name the route the body is for (no messages, prompt, input or kind to tell by)")
