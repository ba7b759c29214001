"""One machine, no services: SQLite, in-process channel layer, file broker.

The default for `make run`. It also serves the scaled mode when
`DATABASE_URL` / `REDIS_URL` are set, for trying that mode on a laptop;
real deployments use `config.settings.production`.
"""

from .base import *  # noqa: F403
from .base import env

DEBUG = env.bool("DJANGO_DEBUG", default=False)
