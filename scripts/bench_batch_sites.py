"""One batch on a federation of two local sites vs one: does the broker spread it, and what does it buy?

Two homes on the demo model (torch backend): one local site, or two (``a``
and ``b``, one replica each, the project granted on both). Both replicas are
warmed first; then the same file of ``--lines`` completions runs through the
batch API, timed from submit to the batch's end. Printed: seconds each way,
the ratio (target >= 1.7x), and how many lines each site served.

Usage:
    python scripts/bench_batch_sites.py [--lines 256] [--tokens 32] [--threads 1]

``--threads`` sets torch's intra-op threads per worker (``OMP_NUM_THREADS``),
so two replicas on a small machine do not fight over the same cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchlib import log, machine
from bench_quotes import batch_file
from bench_service import tpm_serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def home_with_sites(root: Path, model_dir: Path, sites: list[str]):
    from tpm_fed.federation import Federation, ModelConfig, ProjectConfig, SiteConfig
    from tpm_fed.home import TpmHome
    from tpm_fed.identity import LocalUser

    home = TpmHome(root)
    shutil.copytree(model_dir, home.models_dir / "model")
    Federation(
        name="bench-sites",
        sites=[SiteConfig(name=name, max_batch_requests=64) for name in sites],
        models=[ModelConfig(name="model", path=Path("models/model"), backend="torch")],
        projects=[ProjectConfig(name="bench", members=[LocalUser().current()],
                                allocations={name: 1e9 for name in sites})],
    ).dump(home.federation_file)
    return home


def run(home, sites: list[str], source: bytes) -> tuple[float, Counter]:
    from tpm_fed.client import Client

    with tpm_serve(home) as (url, headers):
        client = Client(url, headers["Authorization"].split()[1])
        for site in sites:  # a warm replica at every site
            client.generate("warm", max_new_tokens=2, site=site).result()
        started = time.perf_counter()
        batch = client.batches.wait(client.batches.submit(source)["id"], poll_s=0.1)
        took = time.perf_counter() - started
        assert batch["status"] == "completed", batch
        served = Counter(line["response"]["body"]["tpm"]["site"] for line in client.batches.results(batch["id"]))
        client.close()
    return took, served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by tpm serve and its workers

    from tpm_fed.models.demo import make_demo_model

    print(f"bench_batch_sites: {machine()}, OMP_NUM_THREADS={args.threads}")
    source = batch_file(args.lines, [args.tokens])
    with tempfile.TemporaryDirectory(prefix="tpm-bench-sites-") as scratch:
        scratch = Path(scratch)
        model_dir = make_demo_model(scratch / "demo", progress=False)
        log("one site...")
        one, one_served = run(home_with_sites(scratch / "one", model_dir, ["a"]), ["a"], source)
        log("two sites...")
        two, two_served = run(home_with_sites(scratch / "two", model_dir, ["a", "b"]), ["a", "b"], source)
    print(f"\n{args.lines} lines x {args.tokens} tokens through the batch API")
    print(f"  one site:  {one:7.2f} s   lines per site {dict(one_served)}")
    print(f"  two sites: {two:7.2f} s   lines per site {dict(two_served)}")
    print(f"  two / one: {one / two:7.2f}x faster   (target >= 1.7x)")


if __name__ == "__main__":
    main()
