"""What ``tpm submit`` prints: the text, then one line of usage, version, place, warmth and charge.

Both of its paths print through here: the warm one (:mod:`tpm_fed.cli.quick_stream`) and the full
client's (:mod:`tpm_fed.cli.submit_full`). The result types are named for the reader only: importing
them would cost the warm path the request contract's pydantic models.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import click

if TYPE_CHECKING:
    from tpm_fed.protocol.quotes import Quote
    from tpm_fed.protocol.results import GenerationResult


class StreamedAnswer(Protocol):
    """What a finished stream tells besides its text (``CompletionStream`` and ``QuickStream`` both do)."""

    usage: dict[str, int] | None
    tpm: dict[str, Any]


def hot(cards: dict[str, dict], model: str) -> bool:
    """Whether any site holds a warm replica of ``model`` (so the answer comes in milliseconds)."""
    return "hot" in cards.get(model, {}).get("tpm", {}).get("sites", {}).values()


def print_stream(pieces: Iterable[str], answer: StreamedAnswer, model: str) -> None:
    """Echo each piece as it comes, then the summary line from what the stream's last events said."""
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()
    tpm, usage = answer.tpm, answer.usage or {}
    charge = tpm.get("charge")
    warmth = "warm" if tpm.get("warm") else f"cold, loaded in {tpm.get('load_s', 0):.2f} s"
    paid = ("free on " + charge["project"] + "'s own site" if charge["free"]
            else f"{charge['charged_su']:.6f} SU to {charge['project']}") if charge else None
    click.echo(f"[{usage.get('prompt_tokens')} prompt + {usage.get('completion_tokens')} completion tokens"
               f" | {model}@{tpm.get('version')} | {tpm.get('backend')} on {tpm.get('site')}"
               f" | replica {warmth}" + (f" | {paid}]" if paid else "]"))
    if tpm.get("streamed") is False:
        click.echo("note: the site could not stream back to the service; the text came at the end", err=True)
    for note in tpm.get("notes", []):
        click.echo(f"note: {note}", err=True)


def print_quote(quote: Quote, as_json: bool, explain: bool) -> None:
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


def print_result(result: GenerationResult, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.to_wire(), indent=2))
        return
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


def _charge(result: GenerationResult) -> str:
    charge = result.charge
    if charge.free:
        return f"free on {charge.project}'s own site"
    return f"{charge.charged_su:.6f} SU to {charge.project}"
