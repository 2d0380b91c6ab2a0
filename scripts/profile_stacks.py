"""Count where a py-spy profile's samples went: by thread, by the deepest tpm_fed function, by function.

Reads py-spy's raw collapsed stacks (``py-spy record --format raw --threads``,
as ``scripts/bench_batch_sites.py --profile`` writes them; one or more
files, added up). Prints the share of samples per thread (pool threads by
their name's stem), per deepest ``tpm_fed`` frame of each thread (where our
code hands over to a library), and per ``tpm_fed`` function counted
inclusively (every sample under it). With ``--under FUNCTION``: only the
samples under that function, counted inclusively by every frame below it.

Usage:
    python scripts/profile_stacks.py FILE [FILE...] [--top 30] [--under BatchRunner._send]
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path


def stacks(paths: list[Path]):
    """(thread, frames, samples) for every line of the files; a frame is ``function file``."""
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            thread = re.sub(r"\s*\(\d+\)|_\d+$|-\d+$|0x[0-9a-f]+", "", frames[0]).strip()
            yield thread, [_frame(f) for f in frames[1:]], int(count)


def _frame(text: str) -> str:
    name, _, where = text.partition(" (")
    return f"{name} {where.split(':')[0]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--under", default=None, help="count only the samples under this function")
    args = parser.parse_args()
    threads, deepest, inclusive = (collections.Counter() for _ in range(3))
    total = 0
    for thread, frames, count in stacks(args.files):
        if args.under is not None:
            names = [frame.split(" ")[0] for frame in frames]
            if args.under not in names:
                continue
            frames = frames[names.index(args.under):]
        total += count
        threads[thread] += count
        ours = [frame for frame in frames if "tpm_fed/" in frame]
        deepest[f"{thread}: {ours[-1].split(' ')[0] if ours else '(no tpm_fed frame)'}"] += count
        for frame in set(frames if args.under is not None else ours):
            inclusive[frame] += count
    print(f"{total} samples" + (f" under {args.under}" if args.under else ""))
    for title, counter in (("by thread", threads), ("by deepest tpm_fed function", deepest),
                           ("inclusive", inclusive)):
        print(f"\n{title}:")
        for key, count in counter.most_common(args.top):
            print(f"  {count:6d} {100 * count / max(1, total):5.1f}%  {key}")


if __name__ == "__main__":
    main()
