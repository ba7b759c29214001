"""Prepare `PROMETHEUS_MULTIPROC_DIR` before a process starts writing to it.

`python -m monitoring.metrics_dir DIR` is what the Procfile's `web` and
`worker` lines run first. The directory is shared by every process of a
machine (each uvicorn, each Celery worker) and `/metrics` adds up its files,
so a process that starts must not delete the files of processes that still
run: that reset every counter of the machine, and a second web process (one
uvicorn per CPU, docs/deploy.md) or a restarted one wiped the first's
metrics. The directory is emptied only when no process that wrote to it is
alive (a fresh start); otherwise it is kept, dead processes' counters
included, so the machine's totals never go backwards. Dead processes' live
gauges are dropped at each scrape (`monitoring.metrics`).

No Django here: it runs before the app, with only the standard library.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

_FILE = re.compile(r"^\w+_(\d+)\.db$")


def writer_pids(path: Path) -> set[int]:
    """The process ids that own a metrics file in `path`."""
    pids: set[int] = set()
    for entry in path.iterdir():
        match = _FILE.match(entry.name)
        if match:
            pids.add(int(match.group(1)))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    return True


def prepare(path: Path) -> bool:
    """Create `path`; empty it if no process that wrote there lives. Return whether emptied."""
    path.mkdir(parents=True, exist_ok=True)
    if any(_alive(pid) for pid in writer_pids(path)):
        return False
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0]:
        print("usage: python -m monitoring.metrics_dir DIR", file=sys.stderr)
        return 2
    prepare(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
