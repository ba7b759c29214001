"""Health and metrics endpoints. Views parse, call one function, format.

Who sees what:
- `/health/live`: anyone; 200 while the process serves, no dependency checked.
- `/health/ready`: anyone gets the status code (200 ok or degraded, 503
  when a critical dependency fails) and `{"status": …}` only, which is all a
  load balancer needs and tells an outsider nothing about the topology;
  `Authorization: Bearer <METRICS_TOKEN>` or a staff session also get every
  check with its status, latency and a short reason. A wrong token is not
  an error here: the load balancer must never be refused its answer.
- `/metrics`: METRICS_TOKEN or staff; 401 without credentials, 403 with
  wrong ones.
- `/health/`: staff (others go to the admin login).
"""

from __future__ import annotations

import asyncio
import hmac
import time

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from monitoring import health, metrics, selectors

STARTED_AT = time.time()


@require_GET
def live(request: HttpRequest) -> JsonResponse:
    """Answer 200 while the process serves; checks no dependency on purpose."""
    return JsonResponse({"status": "ok"})


def _bearer_ok(request: HttpRequest) -> bool | None:
    """Return True for the right token, False for a wrong one, None when none was given."""
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return None
    expected = settings.METRICS_TOKEN
    return bool(expected) and hmac.compare_digest(header[7:].strip().encode(), expected.encode())


async def _is_staff(request: HttpRequest) -> bool:
    user = await request.auser()
    return bool(user.is_active and user.is_staff)


@never_cache
@require_GET
async def ready(request: HttpRequest) -> JsonResponse:
    """Answer 200 or 503 from the dependency checks (see the module docstring)."""
    # Checks block on sockets: run them off the event loop and off the
    # shared ORM thread the chat's database calls queue on.
    overall, results = await asyncio.to_thread(health.health_check_all)
    status = 503 if overall == "fail" else 200
    body: dict[str, object] = {"status": overall}
    if _bearer_ok(request) or await _is_staff(request):
        body["checks"] = {r.name: r.as_json() for r in results}
    return JsonResponse(body, status=status)


@never_cache
@require_GET
async def metrics_view(request: HttpRequest) -> HttpResponse:
    """Serve the Prometheus exposition, summed over every process."""
    token = _bearer_ok(request)
    if token is None and not await _is_staff(request):
        user = await request.auser()
        if user.is_authenticated:
            return HttpResponse("Staff only.\n", status=403, content_type="text/plain")
        response = HttpResponse("Authentication required.\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    if token is False:
        return HttpResponse("Wrong token.\n", status=403, content_type="text/plain")
    text, content_type = await asyncio.to_thread(metrics.render)
    return HttpResponse(text, content_type=content_type)


def _page_data() -> dict[str, object]:
    now = timezone.now()
    return {
        "breakers": selectors.breaker_states(),
        "last_hour": selectors.last_hour_summary(now=now),
        "alerts": selectors.alerts_open(),
    }


@never_cache
@staff_member_required
async def health_page(request: HttpRequest) -> HttpResponse:
    """Show operators every check, breaker, gauge and open alert on one page."""
    (overall, results), data, gauges = await asyncio.gather(
        asyncio.to_thread(health.health_check_all),
        sync_to_async(_page_data)(),
        asyncio.to_thread(metrics.gauges_now),
    )
    return await sync_to_async(render)(
        request,
        "monitoring/health.html",
        {
            "overall": overall,
            "checks": results,
            "gauges": gauges,
            "version": settings.MONITORING_RELEASE or "unknown",
            "environment": settings.MONITORING_ENVIRONMENT,
            "uptime_s": int(time.time() - STARTED_AT),
            "refresh_s": settings.MONITORING_HEALTH_REFRESH_S,
            **data,
        },
        status=503 if overall == "fail" else 200,
    )
