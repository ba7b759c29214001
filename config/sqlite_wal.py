"""Checkpoint the embedded mode's SQLite files from a thread of their own.

In WAL mode SQLite copies the log back into the database (a checkpoint, with
an fsync) inside whichever commit pushes the log past `wal_autocheckpoint`
pages. That commit is a chat message's: measured, one message in ~70 waited
2-10 ms for it, which was most of the time-to-first-token p99. The web
process therefore checkpoints both files every second from this thread
(PASSIVE: it never waits for, or blocks, a writer), and its connections only
checkpoint themselves as a backstop, past BACKSTOP_PAGES.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence

logger = logging.getLogger(__name__)

# Serving connections checkpoint only past this (~80 MB of log): a safety
# net for processes without the thread below (manage.py, the worker).
BACKSTOP_PAGES = 20_000
EVERY_S = 1.0

_started: set[str] = set()
_lock = threading.Lock()


def checkpoint(path: str) -> tuple[int, int, int]:
    """Checkpoint what no reader still needs; return SQLite's (busy, log, checkpointed)."""
    conn = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        busy, log, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(busy), int(log), int(done)
    finally:
        conn.close()


def start(paths: Sequence[str], every_s: float = EVERY_S) -> None:
    """Checkpoint these files every `every_s` seconds from a daemon thread (once per file)."""
    with _lock:
        todo = [p for p in paths if p not in _started]
        _started.update(todo)
    if not todo:
        return

    def run() -> None:
        while True:
            time.sleep(every_s)
            for path in todo:
                if not os.path.exists(path):
                    continue  # not created yet: connecting would create it
                try:
                    checkpoint(path)
                except sqlite3.Error as exc:
                    logger.warning("WAL checkpoint of %s failed: %s", path, exc)

    threading.Thread(target=run, name="sqlite-checkpoint", daemon=True).start()
