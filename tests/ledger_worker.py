"""Run by tests in separate processes: reserve and settle against one ledger, or race on the same reservations.

``ledger_worker.py URL PREFIX ATTEMPTS ESTIMATE COST``: reserve and settle fresh requests.
``ledger_worker.py race URL settle|release IDS_FILE GO_FILE``: once GO_FILE exists, settle
(or release) every id of IDS_FILE, one at a time, and print what this process moved for each.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tpm_fed.protocol.errors import InsufficientBalance
from tpm_fed.ledger import Ledger, Metered
from tpm_fed.state.database import open_database


def main(url: str, prefix: str, attempts: int, estimate: int, cost: int) -> None:
    ledger = Ledger(open_database(url))
    settled = refused = 0
    for index in range(attempts):
        request_id = f"{prefix}-{index}"
        try:
            ledger.reserve(request_id, project="p", site="s", identity="u", model="m",
                           version="v", kind="generate", estimate_usu=estimate)
        except InsufficientBalance:
            refused += 1
            continue
        ledger.settle(request_id, Metered(prompt_tokens=1), cost)
        ledger.settle(request_id, Metered(prompt_tokens=1), cost)  # a duplicated completion
        settled += 1
    print(settled, refused)


def race(url: str, mode: str, ids_file: str, go_file: str) -> None:
    ledger = Ledger(open_database(url))
    ids = Path(ids_file).read_text().split()
    if mode == "release":
        ids.reverse()  # meet the settling processes in the middle, and each other all along
    while not os.path.exists(go_file):  # every process starts at once
        time.sleep(0.005)
    for request_id in ids:
        if mode == "settle":
            moved = ledger.settle(request_id, Metered(prompt_tokens=1), 50_000)
        else:
            moved = -1 if ledger.release(request_id, f"raced by {os.getpid()}") else 0
        print(request_id, moved)


if __name__ == "__main__":
    if sys.argv[1] == "race":
        race(*sys.argv[2:6])
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
