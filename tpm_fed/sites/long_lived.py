"""The collector in the service's process: what a started site leaves there is kept out of its full
passes, and its youngest generation is collected less often.

A site's start imports the endpoint engine and Parsl and builds their
objects: with the service's own, about 137,000 tracked objects on the demo
federation, all living as long as the process. Python's full collection
walks every one of them; on this 2-core machine one took 0.1-0.17 s, and
one fell due in the first batch a service ran (256 lines: about a fifth of
the service's CPU for the whole batch; docs/performance.md, "Two local
sites: the service's CPU per batch line"). ``gc.freeze()`` moves what is
alive now into a generation no collection walks, as vLLM's server does once
it has started; a collection first, so only what is alive is kept. What
the service allocates later is collected as before, and at exit the frozen
objects are handed back, so the interpreter's last collection frees them
as it would have (extensions that count their objects at exit, nanobind's,
report none leaked).

The service's process also collects its youngest generation less often
(:data:`YOUNG_THRESHOLD` net new objects instead of Python's 700). A request
builds and drops a few hundred tracked objects (its models, dicts, futures);
at 700 the collector ran 155 times a second under 64 clients of 1-token
requests, and with the middle generation's passes it held the GIL 73-85 ms
of every second, about 8% of the process, walking objects that reference
counting was about to free anyway. At 50,000 it did not run at all during
that load: what a request allocates is freed before the count gets there.
Cyclic garbage still goes at the next pass; it waits for more allocations.

Only ``tpm serve`` asks for either (:func:`tune_collector_in_this_process`):
both are process-wide, and in a user's own process (a script that runs the
engine in process) cyclic garbage made of objects alive at the freeze would
stay until exit. So a site started anywhere else leaves the collector as it
was.
"""

from __future__ import annotations

import atexit
import gc
import threading
from collections.abc import Callable

_service: list[Callable[[str], None]] = []  # set once by the service's process: where to say it froze
_handed_back_at_exit = threading.Event()


YOUNG_THRESHOLD = 50_000
"""Net new tracked objects that start a collection of the youngest generation in the service's process."""


def tune_collector_in_this_process(report: Callable[[str], None]) -> None:
    """This process is the service's (``tpm serve``): its youngest generation is collected less often, from
    now on a site's start freezes the heap, and ``report`` is told how many objects each freeze kept out."""
    _service[:] = [report]
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def keep_out_of_full_collections() -> int:
    """In the service's process: collect once, then freeze every object alive now (the process's
    long-lived heap). Returns the objects frozen in all (0: not the service's process, nothing done)."""
    if not _service:
        return 0
    gc.collect()
    gc.freeze()
    if not _handed_back_at_exit.is_set():
        _handed_back_at_exit.set()
        atexit.register(gc.unfreeze)
    frozen = gc.get_freeze_count()
    _service[0](f"tpm: a site started; {frozen:,} long-lived objects are kept out of the collector's full passes")
    return frozen
