"""How good a batch's quote is: charged vs quoted service units, and actual vs estimated time, over batch sizes.

For each size, a JSONL file of ``/v1/completions`` lines (greedy, lengths
cycling through ``--lengths``) is quoted (``POST /v1/quotes``: nothing
runs), then submitted and waited for, on ``tpm serve`` over the demo model
(torch backend, warm replica; its first batches of 2 and 16 lines let the
broker measure its pace by task size, as any use would). Printed per size: the quote's bound
(``max_su``) and expectation (``expected_su``) against the charge, and the
estimated seconds against the measured ones (targets: charged / quoted <=
1.0 always; actual / estimated within 0.7-1.3).

Usage:
    python scripts/bench_quotes.py [--sizes 8,32,128,512] [--lengths 8,16,32,64]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchlib import PROMPTS, log, machine
from bench_service import bench_home, tpm_serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def batch_file(lines: int, lengths: list[int]) -> bytes:
    return "\n".join(json.dumps({
        "custom_id": f"line-{index}", "method": "POST", "url": "/v1/completions",
        "body": {"model": "model", "prompt": PROMPTS[index % len(PROMPTS)], "temperature": 0,
                 "max_tokens": lengths[index % len(lengths)]},
    }) for index in range(lines)).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8,32,128,512")
    parser.add_argument("--lengths", default="8,16,32,64")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    lengths = [int(s) for s in args.lengths.split(",")]

    from tpm_fed.client import Client
    from tpm_fed.models.demo import make_demo_model

    print(f"bench_quotes: {machine()}")
    with tempfile.TemporaryDirectory(prefix="tpm-bench-quotes-") as scratch:
        scratch = Path(scratch)
        log("making the demo model...")
        home = bench_home(scratch / "home", make_demo_model(scratch / "demo", progress=False), backend="torch")
        with tpm_serve(home) as (url, headers):
            client = Client(url, headers["Authorization"].split()[1])
            log("warming the replica (and letting the broker measure its pace at two task sizes)...")
            for lines in (2, 2, 16):
                client.batches.wait(client.batches.submit(batch_file(lines, lengths))["id"], poll_s=0.2)
            rows = []
            for size in sizes:
                source = batch_file(size, lengths)
                quote = client.batches.quote(source)
                started = time.perf_counter()
                batch = client.batches.wait(client.batches.submit(source)["id"], poll_s=0.1)
                took = time.perf_counter() - started
                assert batch["status"] == "completed", batch
                rows.append((size, quote, batch["tpm"]["charged_su"], took))
                log(f"  {size} lines: {took:.1f} s")
            client.close()
    print(f"\n{'lines':>6} {'max_su':>10} {'expected_su':>12} {'charged_su':>11} {'charged/max':>12} "
          f"{'charged/expected':>17} {'estimated_s':>12} {'actual_s':>9} {'actual/est':>11}")
    for size, quote, charged, took in rows:
        print(f"{size:>6} {quote['max_su']:>10.4f} {quote['expected_su']:>12.4f} {charged:>11.4f} "
              f"{charged / quote['max_su']:>12.3f} {charged / quote['expected_su']:>17.3f} "
              f"{quote['estimated_s']:>12.2f} {took:>9.2f} {took / quote['estimated_s']:>11.2f}")


if __name__ == "__main__":
    main()
