"""Run by tests in separate processes: reserve and settle against one ledger."""

from __future__ import annotations

import sys

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


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
