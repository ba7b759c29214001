from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET


@require_GET
def live(request: HttpRequest) -> JsonResponse:
    """Answer 200 while the process serves; checks no dependency on purpose."""
    return JsonResponse({"status": "ok"})
