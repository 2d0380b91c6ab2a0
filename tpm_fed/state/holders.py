"""Which process holds a row (a replica, a reservation), and whether it still lives.

A row written by a process of this machine names it ``host:pid``; once that
process is gone, whatever it held in memory (a replica's worker pool, a
batch in flight) is gone with it, and the row can be settled by others. A
process on another machine is not ours to judge: it is assumed alive.
"""

from __future__ import annotations

import os
import socket


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def process_alive(holder: str | None) -> bool:
    if not holder:
        return True  # written before rows named their holder: only a deadline settles it
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
