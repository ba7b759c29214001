"""Scaled deployments: real secret, HTTPS, strict cookies, services from the env.

`manage.py check --deploy` passes with this module; the README lists the
checks that are deliberately left to the operator.
"""

from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F403
from .base import env

DEBUG = False
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if len(SECRET_KEY) < 50 or SECRET_KEY.startswith("dev-insecure"):
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY must be set to a random string of at least 50 characters "
        "in production (python -c 'import secrets; print(secrets.token_urlsafe(64))')."
    )

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
# Health and metrics are scraped over plain HTTP inside the network.
SECURE_REDIRECT_EXEMPT = [r"^health/", r"^metrics$"]
SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=60 * 60 * 24 * 365)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = env.bool("DJANGO_HSTS_PRELOAD", default=True)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
X_FRAME_OPTIONS = "DENY"

# Content-Security-Policy (base.py): HTTPS only. The middleware adds the
# page's own wss:// origin to connect-src; plain ws:// is never listed here.
CONTENT_SECURITY_POLICY["DIRECTIVES"] = {  # noqa: F405
    **CONTENT_SECURITY_POLICY["DIRECTIVES"],  # noqa: F405
    "upgrade-insecure-requests": True,
}
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
SESSION_COOKIE_HTTPONLY = True
LANGUAGE_COOKIE_SECURE = True

# Password-reset links are as good as a password: they go by SMTP only (the
# EMAIL_* variables, base.py), never to the console, where anyone who reads
# the logs could use them. `check --deploy` fails until a server is set.
EMAIL_BACKEND = env.str(
    "DJANGO_EMAIL_BACKEND", default="django.core.mail.backends.smtp.EmailBackend"
)
