"""``tpm submit`` through the full client: several prompts, ``--json``, ``--explain``, ``--quote``,
a service to start first, a stored login; the warm path's fallback.

The request is built and checked here (:class:`GenerationRequest`), before anything is sent.
"""

from __future__ import annotations

import click

from tpm_fed.cli.submit_output import hot, print_quote, print_result, print_stream
from tpm_fed.client import Client
from tpm_fed.completion_stream import CompletionStream, completion_body
from tpm_fed.protocol.errors import PlacementRefused
from tpm_fed.protocol.generation import GenerationRequest


def submit_with_client(prompts: list[str], *, model: str | None, max_new_tokens: int, temperature: float,
                       top_p: float, seed: int | None, stop: list[str], backend: str | None, project: str | None,
                       location: str | None, site: str | None, explain: bool, quote: bool, as_json: bool,
                       stream: bool) -> None:
    """What ``tpm submit`` does with these options (the command's own, already parsed)."""
    with Client(progress=True) as client:
        cards = {card["id"]: card for card in client.models()}  # one call: the default model and its warmth
        if not cards:
            raise click.ClickException(f"the service at {client.url} serves no models")
        request = GenerationRequest.create(
            prompts, model or next(iter(cards)), max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, stop=stop, backend=backend, project=project, location=location, site=site,
        )  # bad input is refused here, before anything is sent
        if quote:
            print_quote(client.quote(request), as_json, explain)
            return
        if not hot(cards, request.model.name):
            click.echo(f"tpm: no warm replica of {request.model.name} yet (a cold start takes seconds)...", err=True)
        if stream and len(prompts) == 1 and not (as_json or explain):
            answer = CompletionStream(client._http, completion_body(request), client.url)
            print_stream(answer, answer, request.model.name)
            return
        try:
            result = client.submit(request).result()
        except PlacementRefused as refused:
            if explain:
                click.echo(refused.explanation, err=True)
            raise
    print_result(result, as_json)
    if explain and not as_json:
        click.echo(result.placement, err=True)
