"""``tpm batch``: run a JSONL file of requests (OpenAI's batch format) on the service, and read its results."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from tpm_fed.cli.context import connect
from tpm_fed.cli.tables import format_su, print_table


@click.group()
def batch() -> None:
    """Batches: a JSONL file of requests (custom_id, method, url, body per line), run by the service.

    Lines may name /v1/completions, /v1/chat/completions, /v1/embeddings or
    /tpm/v1/requests (any kind, traces too). The service checks every line
    before anything runs, runs each once even across restarts, and charges
    only the lines that ran.
    """


@batch.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--project", default=None, help="Project every line charges (needed if you are in several).")
@click.option("--quote", is_flag=True, help="Print the most it would cost and when it would be done; run nothing.")
@click.option("--wait", is_flag=True, help="Show progress until the batch ends (Ctrl-C stops watching, not the batch).")
@click.option("--metadata", "metadata", multiple=True, help="KEY=VALUE to keep with the batch (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the batch (or quote) as JSON.")
def submit(file: Path, project: str | None, quote: bool, wait: bool, metadata: tuple[str, ...],
           as_json: bool) -> None:
    """Upload FILE and run its lines (or only quote them)."""
    tags = _metadata(metadata)
    with connect() as client:
        if quote:
            priced = client.batches.quote(file, project=project)
            if as_json:
                click.echo(json.dumps(priced, indent=2))
                return
            _print_quote(priced)
            return
        created = client.batches.submit(file, project=project, metadata=tags)
        if not wait:
            click.echo(json.dumps(created, indent=2) if as_json else
                       f"{created['id']}: {created['request_counts']['total']} lines, {created['status']} "
                       f"(tpm batch status {created['id']})")
            return
        click.echo(f"{created['id']}: {created['request_counts']['total']} lines", err=True)
        ended = _watch(client, created)
    click.echo(json.dumps(ended, indent=2) if as_json else _summary(ended))
    if ended["status"] != "completed" or ended["request_counts"]["failed"]:
        sys.exit(1)


@batch.command(name="list")
def list_batches() -> None:
    """Your batches, newest first."""
    with connect() as client:
        batches = client.batches.list()
    if not batches:
        click.echo("no batches")
        return
    print_table(
        ["batch", "status", "done", "failed", "total", "SU", "project", "created"],
        [(b["id"], b["status"], b["request_counts"]["completed"], b["request_counts"]["failed"],
          b["request_counts"]["total"], format_su(b["tpm"]["charged_su"]), b["tpm"]["project"],
          _when(b["created_at"])) for b in batches],
        right={"done", "failed", "total", "SU"},
    )


@batch.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole batch object as JSON.")
def status(batch_id: str, as_json: bool) -> None:
    """A batch's status, counts, tokens and charge."""
    with connect() as client:
        found = client.batches.retrieve(batch_id)
    click.echo(json.dumps(found, indent=2) if as_json else _summary(found))


@batch.command()
@click.argument("batch_id")
def cancel(batch_id: str) -> None:
    """Stop a batch: lines not started never run; lines running finish and are charged."""
    with connect() as client:
        stopped = client.batches.cancel(batch_id)
    click.echo(f"{batch_id}: {stopped['status']} ({stopped['request_counts']['completed']} lines done; lines running "
               "now finish, the rest will not run)")


@batch.command()
@click.argument("batch_id")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the JSONL here instead of printing it.")
def results(batch_id: str, out: Path | None) -> None:
    """Every line that ended, answers and errors together, in input order (JSONL)."""
    with connect() as client:
        content = client.batches.results_jsonl(batch_id)
    if out is None:
        click.echo(content.decode(), nl=False)
        return
    out.write_bytes(content)
    click.echo(f"{len(content.splitlines())} lines written to {out}", err=True)


def _watch(client: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """A progress bar of lines, with tokens, SUs and the estimated finish, until the batch ends."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[facts]}")]
    with Progress(*columns, transient=False, console=_stderr_console()) as progress:
        bar = progress.add_task(batch["id"], total=batch["request_counts"]["total"], facts="")

        def show(now: dict[str, Any]) -> None:
            counts, tpm = now["request_counts"], now["tpm"]
            ended = counts["completed"] + counts["failed"]
            left = counts["total"] - ended - tpm["cancelled"]
            finish = tpm.get("estimated_finish_at")  # the service's: the pace so far, else the quote
            eta = f"done in ~{max(0.0, finish - time.time()):.0f} s" if finish and left else ""
            facts = (f"{tpm['prompt_tokens'] + tpm['completion_tokens']:,} tokens | {tpm['charged_su']:.6f} SU"
                     f"{' | ' + str(counts['failed']) + ' failed' if counts['failed'] else ''} | {now['status']}"
                     f"{' | ' + eta if eta else ''}")
            progress.update(bar, completed=ended, facts=facts)

        return client.batches.wait(batch["id"], poll_s=0.5, progress=show)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _summary(found: dict[str, Any]) -> str:
    counts, tpm, usage = found["request_counts"], found["tpm"], found.get("usage") or {}
    lines = [
        f"{found['id']}: {found['status']}",
        (f"  lines: {counts['completed']} done, {counts['failed']} failed, {tpm['cancelled']} cancelled, "
         f"{tpm['running']} running, {tpm['pending']} waiting, of {counts['total']}"),
        f"  tokens: {usage.get('input_tokens', 0):,} in, {usage.get('output_tokens', 0):,} out",
        f"  charged: {tpm['charged_su']:.6f} SU to {tpm['project']}",
    ]
    if tpm.get("quote"):
        lines.append(f"  quoted: at most {tpm['quote']['max_su']:.6f} SU, about {tpm['quote']['estimated_s']:.0f} s")
    for name in ("output_file_id", "error_file_id"):
        if found.get(name):
            lines.append(f"  {name.removesuffix('_id').replace('_', ' ')}: {found[name]}")
    if found["status"] in ("completed", "cancelled"):
        lines.append(f"  tpm batch results {found['id']} --out results.jsonl")
    return "\n".join(lines)


def _print_quote(quote: dict[str, Any]) -> None:
    per_site = ", ".join(f"{site}: at most {su:.6f} SU of {quote['available_su'].get(site, 0.0):.6f} available"
                         for site, su in quote["max_su_per_site"].items())
    click.echo(f"quote: {quote['lines']} lines for {quote['project']}: at most {quote['max_su']:.6f} SU "
               f"({quote['expected_su']:.6f} SU as placed now; {per_site}); done in about "
               f"{quote['estimated_s']:.0f} s. Nothing was run or charged.")


def _metadata(pairs: tuple[str, ...]) -> dict[str, str] | None:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--metadata")
        tags[key] = value
    return tags or None


def _when(at: int) -> str:
    return dt.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M")
