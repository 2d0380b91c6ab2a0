"""``tpm models``: the models a federation serves.

Listing and inspecting ask the service (``TPM_URL``, or the home's own).
The model store's commands (``add``, ``versions``, ``tag``, ``diff``,
``verify``, ``gc``, ``export``) work on the home's own store, on this
machine: they copy and hash local files. A model added to the store is then
added to the federation through the home's service, which serves it at once.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from tpm_fed.cli.context import connect, connect_home, open_home
from tpm_fed.cli.tables import print_table
from tpm_fed.store import ModelStore


@click.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """List models with their current version id, backend, context length, and the nodes a replica holds per site."""
    if ctx.invoked_subcommand is not None:
        return
    with connect() as client:
        cards = client.models()
    rows = []
    for card in cards:
        about = card["tpm"]
        version = about["version"] or f"unavailable: {about.get('problem', 'unknown')}"
        rows.append((card["id"], version, about.get("context_length"), about["backend"], about["dtype"],
                     about.get("source"), _nodes(about)))
    print_table(["model", "version", "context", "backend", "dtype", "source", "nodes"], rows, right={"context"})


def _nodes(about: dict) -> str:
    """Nodes one replica holds at each site ("big:2"), and the sites too small for it."""
    held = ",".join(f"{site}:{count}" for site, count in about.get("nodes", {}).items())
    small = ",".join(about.get("unplaceable", {}))
    return held + (f" (too small: {small})" if small else "")


def _store():
    home, federation = open_home()
    return ModelStore(federation.store), home, federation


def _split(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition("@")
    return name, version or None


@models.command("add")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Model name (added to the federation if new).")
@click.option("--tag", default=None, help="Also tag the new version (e.g. v1, prod).")
def add(model_dir: Path, name: str, tag: str | None) -> None:
    """Import MODEL_DIR (a Hugging Face directory) as a new version of NAME."""
    store, home, federation = _store()
    version = store.import_dir(model_dir, name, tag, progress=True)
    if name not in {m.name for m in federation.models}:
        with connect_home(home) as client:
            client.admin.add_model({"name": name, "store": True})
        click.echo(f"model {name!r} added to the federation (served from the store)", err=True)
    click.echo(f"{name}@{version}")


@models.command("versions")
@click.argument("name")
def versions(name: str) -> None:
    """Versions of NAME in the store, oldest first, with tags and sizes."""
    store, _, _ = _store()
    print_table(
        ["version", "imported", "bytes", "parent", "tags"],
        [(info.version, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created)), f"{info.nbytes:,}",
          info.parent[:16] if info.parent else "first", " ".join(info.tags)) for info in store.versions(name)],
        right={"bytes"},
    )


@models.command("tag")
@click.argument("ref")
@click.argument("tag")
@click.option("--move", is_flag=True, help="Move the tag if another version has it.")
def tag_version(ref: str, tag: str, move: bool) -> None:
    """Tag version REF (NAME@VERSION) as TAG."""
    store, _, _ = _store()
    name, version = _split(ref)
    click.echo(f"{name}@{store.tag(name, version or 'latest', tag, move=move)} tagged {tag}")


@models.command("diff")
@click.argument("first")
@click.argument("second")
def diff(first: str, second: str) -> None:
    """Tensors that differ between FIRST and SECOND (each NAME@VERSION or NAME@TAG)."""
    store, _, _ = _store()
    a, b = (store.resolve(*_split(ref)) for ref in (first, second))
    changes = store.diff(a, b)
    print_table(
        ["change", "tensor", "bytes", "max |diff|"],
        [(c.status, c.name, f"{c.nbytes:,}", None if c.max_abs_diff is None else f"{c.max_abs_diff:.3g}")
         for c in changes],
        right={"bytes", "max |diff|"},
    )
    total = store.manifest(b).nbytes
    changed = sum(c.nbytes for c in changes)
    click.echo(f"{len(changes)} tensors differ: {changed:,} of {total:,} bytes ({changed / max(total, 1):.1%})")


@models.command("verify")
@click.argument("ref", required=False)
def verify(ref: str | None) -> None:
    """Re-hash every chunk of REF (NAME[@VERSION]), or of every version; exit 1 on a problem."""
    store, _, _ = _store()
    if ref is None:
        targets = None
    else:
        name, version = _split(ref)
        targets = [store.resolve(name, version)] if version else [v.version for v in store.versions(name)]
    problems = store.verify(targets, progress=True)
    for problem in problems:
        click.echo(str(problem), err=True)
    if problems:
        raise SystemExit(1)
    click.echo("every chunk matches its hash")


@models.command("gc")
def gc() -> None:
    """Remove chunks no version uses (after a failed import, say)."""
    store, _, _ = _store()
    removed, freed = store.gc()
    click.echo(f"removed {removed} chunks, {freed:,} bytes")


@models.command("export")
@click.argument("ref")
@click.argument("out_dir", type=click.Path(path_type=Path))
def export(ref: str, out_dir: Path) -> None:
    """Write version REF (NAME@VERSION) back as a plain Hugging Face directory."""
    store, _, _ = _store()
    version = store.resolve(*_split(ref))
    store.export(version, out_dir, progress=True)
    click.echo(f"{ref} -> {out_dir}")


@models.command("inspect")
@click.argument("ref")
@click.option("--grep", "pattern", default=None, help="Only points whose name contains this text.")
def inspect(ref: str, pattern: str | None) -> None:
    """List every hookable point of REF (NAME[@VERSION]) with its feature shape.

    Shapes leave out the batch and sequence dimensions. Read from the model's
    config alone (probed on the meta device), so no weights are loaded.
    """
    with connect() as client:
        points = client.points(ref)
    click.echo(f"layers: {len(points.layers)} ({points.layers[0]} .. {points.layers[-1]}); hidden size "
               f"{points.hidden_size}; vocabulary {points.vocab_size}; final norm {points.final_norm}; "
               f"unembedding {points.unembedding}")
    print_table(["point", "module", "features"],
                [(point, module_type, f"[{features}]") for point, module_type, features in points.describe()
                 if pattern is None or pattern in point])
