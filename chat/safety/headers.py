"""The Content-Security-Policy header, with the page's own WebSocket origin.

CSP Level 3 lets `connect-src 'self'` match `ws:`/`wss:` on the same host, but
older engines do not, and the origin is only known per request (it is the
host the browser asked for, already checked against ALLOWED_HOSTS). So the
policy from `CONTENT_SECURITY_POLICY` gets `wss://<host>` added on HTTPS
pages and `ws://<host>` on plain-HTTP ones, and nothing else.
"""

from __future__ import annotations

from csp.middleware import CSPMiddleware, PolicyParts
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponseBase


class ContentSecurityPolicyMiddleware(CSPMiddleware):
    def get_policy_parts(
        self,
        request: HttpRequest,
        response: HttpResponseBase,
        report_only: bool = False,
    ) -> PolicyParts:
        parts = super().get_policy_parts(request, response, report_only)
        try:
            host = request.get_host()
        except DisallowedHost:
            return parts
        socket_origin = f"{'wss' if request.is_secure() else 'ws'}://{host}"
        update = dict(parts.update or {})
        connect = update.get("connect-src") or []
        if isinstance(connect, str):
            connect = [connect]
        update["connect-src"] = [*connect, socket_origin]
        parts.update = update
        return parts
