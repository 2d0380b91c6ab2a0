"""``tpm submit``: answer prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import click

from tpm_fed.client import Client
from tpm_fed.completion_stream import CompletionStream, completion_body
from tpm_fed.protocol.errors import PlacementRefused
from tpm_fed.protocol.model import BackendChoice
from tpm_fed.protocol.generation import GenerationRequest
from tpm_fed.protocol.results import GenerationResult


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
    with Client(progress=True) as client:
        cards = {card["id"]: card for card in client.models()}  # one call: the default model and its warmth
        if not cards:
            raise click.ClickException(f"the service at {client.url} serves no models")
        request = GenerationRequest.create(
            prompts,
            model or next(iter(cards)),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=list(stop),
            backend=backend,
            project=project,
            location=location,
            site=site,
        )  # bad input is refused here, before anything is sent
        if quote:
            _print_quote(client.quote(request), as_json, explain)
            return
        if not _hot(cards, request.model.name):
            click.echo(f"tpm: no warm replica of {request.model.name} yet (a cold start takes seconds)...", err=True)
        if stream and len(prompts) == 1 and not (as_json or explain):
            _print_stream(client, request)
            return
        try:
            result = client.submit(request).result()
        except PlacementRefused as refused:
            if explain:
                click.echo(refused.explanation, err=True)
            raise
    if as_json:
        click.echo(json.dumps(result.to_wire(), indent=2))
    else:
        _print_text(result)
    if explain and not as_json:
        click.echo(result.placement, err=True)


def _print_quote(quote, as_json: bool, explain: bool) -> None:
    if as_json:
        click.echo(json.dumps(quote.to_wire(), indent=2))
        return
    where = f"replica {quote.replica}" if quote.replica else "a new replica (cold start)"
    if quote.nodes > 1:
        where += f" on {quote.nodes} nodes, all charged"
    cost = (f"free on {quote.project}'s own site" if quote.free
            else f"at most {quote.max_su:.6f} SU to {quote.project} ({quote.expected_su:.6f} SU as placed now)")
    click.echo(f"quote: {quote.model}@{quote.version} on {quote.site}, {where}: {cost}; "
               f"done in about {quote.estimated_s:.1f} s. Nothing was run or charged.")
    if explain:
        click.echo(quote.explanation, err=True)


def _hot(cards: dict[str, dict], model: str) -> bool:
    """Whether any site holds a warm replica of ``model`` (so the answer comes in milliseconds)."""
    return "hot" in cards.get(model, {}).get("tpm", {}).get("sites", {}).values()


def _print_stream(client: Client, request: GenerationRequest) -> None:
    stream = CompletionStream(client._http, completion_body(request), client.url)
    for piece in stream:
        click.echo(piece, nl=False)
    click.echo()
    tpm, usage = stream.tpm, stream.usage or {}
    charge = tpm.get("charge")
    warmth = "warm" if tpm.get("warm") else f"cold, loaded in {tpm.get('load_s', 0):.2f} s"
    paid = ("free on " + charge["project"] + "'s own site" if charge["free"]
            else f"{charge['charged_su']:.6f} SU to {charge['project']}") if charge else None
    click.echo(f"[{usage.get('prompt_tokens')} prompt + {usage.get('completion_tokens')} completion tokens"
               f" | {request.model.name}@{tpm.get('version')} | {tpm.get('backend')} on {tpm.get('site')}"
               f" | replica {warmth}" + (f" | {paid}]" if paid else "]"))
    if tpm.get("streamed") is False:
        click.echo("note: the site could not stream back to the service; the text came at the end", err=True)
    for note in tpm.get("notes", []):
        click.echo(f"note: {note}", err=True)


def _prompts(prompt: str | None, prompt_file: Path | None) -> list[str]:
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give a PROMPT or --file, not both and not neither")
    if prompt_file is None:
        return [prompt]
    lines = [line for line in prompt_file.read_text().splitlines() if line.strip()]
    if not lines:
        raise click.UsageError(f"{prompt_file} holds no prompts")
    return lines


def _charge(result: GenerationResult) -> str:
    charge = result.charge
    if charge.free:
        return f"free on {charge.project}'s own site"
    return f"{charge.charged_su:.6f} SU to {charge.project}"


def _print_text(result: GenerationResult) -> None:
    many = len(result.completions) > 1
    for index, completion in enumerate(result.completions):
        if many:
            click.echo(f"--- prompt {index} ({completion.finish_reason})")
        click.echo(completion.text)
    warmth = "warm" if result.replica.warm else f"cold, loaded in {result.timings.load_s:.2f} s"
    line = (
        f"[{result.usage.prompt_tokens} prompt + {result.usage.completion_tokens} completion tokens"
        f" | {result.model}@{result.version} | {result.backend} on {result.site}"
        f" | replica {warmth} | {result.timings.total_s:.2f} s"
        + (f" | {_charge(result)}]" if result.charge else "]")
    )
    click.echo(line)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
