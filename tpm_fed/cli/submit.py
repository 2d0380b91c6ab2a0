"""``tpm submit``: answer prompts.

A warm ``tpm submit "..."`` (one prompt, streamed, to a service already
running) takes the light path: the standard library's HTTP client, no
pydantic, no httpx (:mod:`tpm_fed.cli.quick_stream`), so the command costs
little more than Python starting and the request itself. Everything else,
and the light path's fallback when the service named does not answer, goes
through the full client (:mod:`tpm_fed.cli.submit_full`), imported only then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import click

from tpm_fed.cli.quick_stream import QuickStream, ServiceNotAnswering
from tpm_fed.cli.submit_output import hot, print_stream
from tpm_fed.connection import ServiceAddress, from_environment, recorded_service
from tpm_fed.home_root import home_root
from tpm_fed.protocol.backends import BackendChoice


@click.command()
@click.argument("prompt", required=False)
@click.option("--file", "prompt_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read prompts from a file, one per non-empty line.")
@click.option("--model", "model", default=None, help="NAME or NAME@VERSION (default: the federation's first model).")
@click.option("--max-tokens", "max_new_tokens", type=int, default=32, show_default=True,
              help="Most tokens to generate per prompt.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Makes sampling reproducible.")
@click.option("--stop", multiple=True, help="Stop at this string (repeatable).")
@click.option("--backend", type=click.Choice(get_args(BackendChoice)), default=None,
              help="Pin a backend (default: the model's setting in the federation).")
@click.option("--project", default=None, help="Project to charge (needed if you are in several).")
@click.option("--location", default=None, help="Where you or your data are (a location in the federation).")
@click.option("--site", default=None, help="Run only on this site.")
@click.option("--explain", is_flag=True, help="Print the broker's candidates and why the winner won.")
@click.option("--quote", is_flag=True,
              help="Print the most it would cost and when it would be done; run nothing, charge nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Print one prompt's text as it is made (not with --file, --json or --explain).")
def submit(prompt, prompt_file, model, max_new_tokens, temperature, top_p, seed, stop, backend,
           project, location, site, explain, quote, as_json, stream) -> None:
    """Answer PROMPT (or every line of --file) and print the text, usage and model version."""
    prompts = _prompts(prompt, prompt_file)
    options = {"model": model, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
               "seed": seed, "stop": list(stop), "backend": backend, "project": project, "location": location,
               "site": site}
    if stream and len(prompts) == 1 and not (as_json or explain or quote):
        address = _running_service()
        if address is not None:
            try:
                return _stream(address, prompts[0], **options)
            except ServiceNotAnswering:
                pass  # gone since it wrote service.json: the full path starts a new one
    from tpm_fed.cli.submit_full import submit_with_client

    submit_with_client(prompts, **options, explain=explain, quote=quote, as_json=as_json, stream=stream)


def _running_service() -> ServiceAddress | None:
    """The service to stream from without the full client: ``TPM_URL`` with its token, or the home's own
    if its process is alive. ``None`` for a service given without a token (its stored login is the full
    client's) and for a home whose service must be started first."""
    named = from_environment()
    if named is not None:
        return named if named.token else None
    return recorded_service(home_root())


def _stream(address: ServiceAddress, prompt: str, *, model: str | None, **fields: Any) -> None:
    stream = QuickStream(address)
    cards = {card["id"]: card for card in stream.models()}  # also the health check: nothing sent before it
    if not cards:
        stream.close()
        raise click.ClickException(f"the service at {stream.url} serves no models")
    model = model or next(iter(cards))
    name = model.partition("@")[0]
    if name in cards and not hot(cards, name):  # an unknown name is the service's to refuse, next
        click.echo(f"tpm: no warm replica of {name} yet (a cold start takes seconds)...", err=True)
    print_stream(stream.complete(completion_body(prompt, model, **fields)), stream, name)


_BODY_FIELDS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
                "stop": "stop", "backend": "backend", "project": "project", "location": "location", "site": "site"}
"""The command's options -> ``/v1/completions`` fields (as :func:`tpm_fed.completion_stream.completion_body`)."""


def completion_body(prompt: str, model: str, **fields: Any) -> dict[str, Any]:
    """The streamed ``/v1/completions`` body; the service checks every field (its 400 names the field)."""
    body = {"model": model, "prompt": prompt, "stream": True, "stream_options": {"include_usage": True}}
    body.update({_BODY_FIELDS[field]: value for field, value in fields.items() if value not in (None, [])})
    return body


def _prompts(prompt: str | None, prompt_file: Path | None) -> list[str]:
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give a PROMPT or --file, not both and not neither")
    if prompt_file is None:
        return [prompt]
    lines = [line for line in prompt_file.read_text().splitlines() if line.strip()]
    if not lines:
        raise click.UsageError(f"{prompt_file} holds no prompts")
    return lines
