"""Streaming a response body that is produced by sync code (database reads)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest


def streamed(request: HttpRequest, chunks: Iterator[str]) -> Iterator[str] | AsyncIterator[str]:
    """Return `chunks` as the body of a StreamingHttpResponse for this request.

    Under ASGI, Django reads a sync iterator whole before it sends the first
    byte; an async one is sent chunk by chunk, each read on the database
    thread. Under WSGI (tests' Client) the sync iterator streams as it is.
    """
    from django.core.handlers.asgi import ASGIRequest

    return _async_chunks(chunks) if isinstance(request, ASGIRequest) else chunks


async def _async_chunks(chunks: Iterator[str]) -> AsyncIterator[str]:
    done = object()

    def step() -> Any:
        return next(chunks, done)

    while True:
        chunk = await sync_to_async(step, thread_sensitive=True)()
        if chunk is done:
            return
        yield chunk
