"""What a started site leaves in the process is kept out of the garbage collector's full passes.

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
"""

from __future__ import annotations

import atexit
import gc
import threading

_handed_back_at_exit = threading.Event()


def keep_out_of_full_collections() -> None:
    """Collect once, then freeze every object alive now (the process's long-lived heap)."""
    gc.collect()
    gc.freeze()
    if not _handed_back_at_exit.is_set():
        _handed_back_at_exit.set()
        atexit.register(gc.unfreeze)
