"""The ``tpm`` commands' listings, laid out by rich.

On a terminal a table fits the window (a long cell folds onto the next
line rather than being cut). Piped or redirected, each row stays on one
line at its natural width, as plain text with no trailing spaces, so
``grep`` and ``awk`` see one record a line.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

import click


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Collection[str] = (),
                indent: int = 0) -> None:
    """Print ``rows`` under ``headers``; columns named in ``right`` are right-aligned (numbers).

    Cells are shown as ``str(cell)`` (``None`` as nothing), never read as rich markup.
    No rows print nothing, not even the headers.
    """
    from rich.console import Console
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for header in headers:
        table.add_column(header, justify="right" if header in right else "left", overflow="fold")
    for row in rows:
        table.add_row(*(Text("" if cell is None else str(cell)) for cell in row))
    if not table.row_count:
        return
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=1_000_000)
    with console.capture() as captured:
        console.print(Padding(table, (0, 0, 0, indent), expand=False) if indent else table)
    click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def format_su(service_units: float | None) -> str:
    """Service units as the ledger counts them (to the micro-SU)."""
    return "" if service_units is None else f"{service_units:,.6f}"
