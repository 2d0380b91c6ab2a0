"""``tpm stores``: knowledge stores beside the models (OpenAI's vector stores), and ``tpm ask --store``."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import click

from tpm_fed.cli.context import connect
from tpm_fed.cli.tables import print_table


@click.group()
def stores() -> None:
    """Vector stores: your documents, chunked and embedded by the federation's encoder, searched and cited.

    Every change makes a new snapshot; a search names the snapshot it used
    (STORE@SNAPSHOT), and searching that ref again gives the same hits until
    `tpm stores gc` collects it.
    """


_FILES = click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))


@stores.command()
@click.argument("name")
@_FILES
@click.option("--project", default=None, help="The project that owns (and pays for) the store.")
@click.option("--model", default=None, help="Embedding model (default: the federation's encoder).")
@click.option("--chunk-tokens", type=int, default=None, help="Static chunks of this many tokens (default: auto).")
@click.option("--overlap-tokens", type=int, default=None, help="Overlap between static chunks (default: half).")
def create(name: str, files: tuple[Path, ...], project: str | None, model: str | None, chunk_tokens: int | None,
           overlap_tokens: int | None) -> None:
    """Make store NAME of FILES (text, Markdown, JSONL, PDF) and wait until they are ingested."""
    with connect() as client:
        with _Progress() as shown:
            store = client.stores.create(name, list(files), project=project, model=model, chunk_tokens=chunk_tokens,
                                         overlap_tokens=overlap_tokens, progress=shown.update)
        click.echo(_summary(store))
        _report_failures(client, store)


@stores.command()
@click.argument("store")
@_FILES
def add(store: str, files: tuple[Path, ...]) -> None:
    """Add FILES to STORE (a new snapshot once they are ingested)."""
    if not files:
        raise click.UsageError("name at least one file")
    with connect() as client:
        with _Progress() as shown:
            found = client.stores.add(store, list(files), progress=shown.update)
        click.echo(_summary(found))
        _report_failures(client, found)


@stores.command(name="list")
def list_stores() -> None:
    """The stores you can see (your projects', and those an operator published)."""
    with connect() as client:
        found = client.stores.list()
    if not found:
        click.echo("no vector stores")
        return
    print_table(["store", "name", "status", "files", "snapshot", "project", "created"],
                [(s["id"], s["name"], s["status"], s["file_counts"]["completed"], s["tpm"]["snapshot"] or "-",
                  s["tpm"]["project"], _when(s["created_at"])) for s in found], right={"files"})


@stores.command()
@click.argument("store")
@click.argument("query")
@click.option("-n", "--max-results", type=int, default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print OpenAI's results page as JSON.")
def search(store: str, query: str, max_results: int, as_json: bool) -> None:
    """Search STORE (or STORE@SNAPSHOT) for QUERY."""
    with connect() as client:
        page = client.stores.search(store, query, max_results=max_results)
    if as_json:
        click.echo(json.dumps(page, indent=2))
        return
    for rank, hit in enumerate(page["data"], 1):
        text = " ".join(hit["content"][0]["text"].split())
        click.echo(f"{rank}. {hit['score']:.4f}  {hit['filename']} (chunk {hit['tpm']['chunk']}): {text[:200]}")
    facts = page["tpm"]
    click.echo(f"[{facts.get('ref') or 'empty store'} | {facts.get('model', '-')}@{str(facts.get('model_version'))[:16]}]",
               err=True)


@stores.command()
@click.argument("store")
def rm(store: str) -> None:
    """Delete STORE and its snapshots."""
    with connect() as client:
        client.stores.remove(store)
    click.echo(f"{store}: deleted")


@stores.command()
@click.argument("store")
def snapshots(store: str) -> None:
    """STORE's snapshots, newest first (* marks the current one)."""
    with connect() as client:
        found = client.stores.snapshots(store)
    print_table(["", "snapshot", "files", "chunks", "model", "made", "why"],
                [("*" if s["current"] else "", s["id"], s["files"], s["chunks"],
                  f"{s['model']}@{s['model_version'][:12]}", _when(s["created_at"]),
                  "collected" if s["collected"] else s["reason"][:60]) for s in found], right={"files", "chunks"})


@stores.command()
@click.option("--keep", type=int, default=1, show_default=True, help="Snapshots kept per store, the current one included.")
def gc(keep: int) -> None:
    """Remove old snapshots' files (pinning a collected snapshot is then refused)."""
    with connect() as client:
        collected = client.stores.gc(keep)["collected"]
    click.echo(f"{len(collected)} snapshots collected" + "".join(f"\n  {ref}" for ref in collected))


@click.command()
@click.argument("question")
@click.option("--store", "store_names", multiple=True, help="Store (NAME, id, or @SNAPSHOT-pinned) to answer from.")
@click.option("--model", default=None, help="The answering model (default: the federation's first).")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--show-prompt", is_flag=True, help="Print the prompt the model was given.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole Responses API object.")
def ask(question: str, store_names: tuple[str, ...], model: str | None, max_tokens: int, show_prompt: bool,
        as_json: bool) -> None:
    """Answer QUESTION with the best chunks of --store in the prompt, and cite them."""
    with connect() as client:
        answer = client.ask(question, list(store_names), model, max_tokens=max_tokens)
    if as_json:
        click.echo(json.dumps(answer["response"], indent=2))
        return
    if show_prompt:
        click.echo(answer["prompt"] + "\n---", err=True)
    click.echo(answer["text"].strip())
    for citation in answer["citations"]:
        click.echo(f"  [{citation['source']}] {citation['filename']} ({citation['file_id']}, chunk {citation['chunk']}, "
                   f"{citation['snapshot']})")
    tpm = answer["response"]["tpm"]
    click.echo(f"[{answer['response']['model']}@{tpm['version']} | {', '.join(filter(None, answer['snapshots'])) or 'no store'}]",
               err=True)


class _Progress:
    """Files ingested so far, as a bar on the terminal (stderr)."""

    def __enter__(self) -> _Progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("ingesting"), BarColumn(), MofNCompleteColumn(), TextColumn("files"),
                             TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self._bar.__enter__()
        self._task = self._bar.add_task("files", total=None)
        return self

    def update(self, store: dict[str, Any]) -> None:
        counts = store["file_counts"]
        self._bar.update(self._task, total=counts["total"], completed=counts["total"] - counts["in_progress"])

    def __exit__(self, *exc_info: object) -> None:
        self._bar.__exit__(*exc_info)


def _summary(store: dict[str, Any]) -> str:
    counts = store["file_counts"]
    return (f"{store['id']} {store['name']!r}: {counts['completed']} files ingested, {counts['failed']} failed; "
            f"snapshot {store['tpm']['snapshot'] or '-'} ({store['tpm']['embedding_model']})")


def _report_failures(client: Any, store: dict[str, Any]) -> None:
    if not store["file_counts"]["failed"]:
        return
    for entry in client.stores.files(store["id"]):
        if entry["status"] == "failed":
            click.echo(f"  failed: {entry['tpm']['filename']} ({entry['id']}): {entry['last_error']['message']}",
                       err=True)
    raise SystemExit(1)


def _when(at: float) -> str:
    return dt.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M")
