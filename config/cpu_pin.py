"""Keep the web process on one CPU (`CHAT_WEB_CPU`).

The web process serves every socket from one event loop and does its
database work on one thread beside it, so each message goes from the loop to
that thread and back. When the two threads run on different CPUs, each
hand-off wakes the other CPU, and on a virtual machine an idle vCPU wakes
slowly and with cold caches. Measured on a 2-vCPU VM (make bench (a), one
connection): time to first token p50 2.5-3.4 ms with the threads free to
move, 1.75-1.78 ms with the process on one CPU. Python's GIL lets only one of
them run Python at a time anyway, so one CPU costs the process next to
nothing (docs/decisions/0009-one-cpu-per-web-process.md).

`CHAT_WEB_CPU`:
- `auto`: the CPU the process is running on when the application loads. The
  default in the embedded mode, which has exactly one web process.
- a CPU number: that CPU. For several web processes on one machine, give
  each its own.
- `off`: leave placement to the scheduler. The default when `REDIS_URL` is
  set (the scaled mode, where several web processes may share a machine).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def current_cpu() -> int | None:
    """Return the CPU this thread last ran on (Linux), else None."""
    try:
        with open("/proc/thread-self/stat", encoding="ascii") as stat:
            # Fields after the command name, which is in parentheses and may
            # hold spaces; "processor" is field 39, the 37th after it.
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[36])
    except (OSError, IndexError, ValueError):
        return None


def pin(setting: str) -> int | None:
    """Move every thread of this process onto one CPU; return it, or None if not pinned."""
    setting = setting.strip().lower()
    if setting in ("", "off"):
        return None
    if not hasattr(os, "sched_setaffinity"):
        logger.info("CHAT_WEB_CPU=%s ignored: this platform cannot pin threads", setting)
        return None
    allowed = os.sched_getaffinity(0)
    if setting == "auto":
        cpu = current_cpu()
        if cpu not in allowed:
            cpu = min(allowed)
    else:
        try:
            cpu = int(setting)
        except ValueError:
            logger.warning("CHAT_WEB_CPU=%r is not auto, off or a CPU number: not pinned", setting)
            return None
        if cpu not in allowed:
            logger.warning(
                "CHAT_WEB_CPU=%d is not one of this process's CPUs %s: not pinned",
                cpu,
                sorted(allowed),
            )
            return None
    if allowed == {cpu}:
        return cpu
    # sched_setaffinity(0) moves only the calling thread: move each one.
    # Threads started later inherit it.
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), {cpu})
            except ProcessLookupError:
                continue  # that thread has just ended
    except OSError as exc:
        logger.warning("could not pin the web process to CPU %d: %s", cpu, exc)
        return None
    logger.info("web process pinned to CPU %d (CHAT_WEB_CPU=%s)", cpu, setting)
    return cpu
