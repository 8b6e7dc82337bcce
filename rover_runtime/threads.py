"""Thread priorities: the control loop first.

The camera and inference threads do the heavy work; the loop's own work per cycle is a fraction of a
millisecond but must not wait for a core. At normal priority (no SCHED_FIFO) the kernel shares the cores
fairly, so a loop thread waking up behind two busy threads on a two-core machine waits milliseconds; a
higher nice value for the busy threads (Linux applies it per thread, by thread id) lets the loop run as
soon as it wakes while they keep every cycle the loop leaves them.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)


def lower_this_thread(nice: int) -> None:
    """Give the calling thread the nice value `nice` (0 = leave it). Never raises: refused = a warning."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError) as exc:
        log.warning("thread %s: nice %d refused (%s)", threading.current_thread().name, nice, exc)
