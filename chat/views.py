from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.forms import UserCreationForm
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods

from chat import selectors
from chat.errors import ChatError, Forbidden
from chat.owners import Owner


def owner_of(request: HttpRequest) -> Owner | None:
    if request.user.is_authenticated:
        return Owner(user_id=request.user.pk)
    if not settings.CHAT_ALLOW_ANONYMOUS or not request.session.session_key:
        return None
    return Owner(user_id=None, session_key=request.session.session_key)


def error_response(exc: ChatError) -> JsonResponse:
    body = {"error": {"code": exc.code, "message": exc.user_message}}
    return JsonResponse(body, status=exc.http_status)


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    if not request.user.is_authenticated:
        if not settings.CHAT_ALLOW_ANONYMOUS:
            return redirect("/accounts/login/?next=/")
        if not request.session.session_key:
            # The WebSocket finds anonymous visitors by their session.
            request.session["anonymous"] = True
            request.session.save()
    provider, _, _model_name = settings.CHAT_MODEL.partition(":")
    return render(
        request,
        "chat/index.html",
        {
            "model": settings.CHAT_MODEL,
            "is_demo": provider == "demo",
            "max_input_chars": settings.CHAT_MAX_INPUT_CHARS,
        },
    )


@require_GET
def conversations(request: HttpRequest) -> JsonResponse:
    owner = owner_of(request)
    if owner is None:
        return error_response(Forbidden("Please sign in to see your conversations."))
    return JsonResponse({"conversations": selectors.conversation_list(owner=owner)})


@require_GET
def conversation_messages(request: HttpRequest, conversation_id: int) -> JsonResponse:
    owner = owner_of(request)
    if owner is None:
        return error_response(Forbidden("Please sign in to see your conversations."))
    try:
        messages = selectors.conversation_messages(owner=owner, conversation_id=conversation_id)
    except ChatError as exc:
        return error_response(exc)
    return JsonResponse({"conversation": conversation_id, "messages": messages})


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    form: UserCreationForm[Any] = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("chat:index")
    return render(request, "registration/signup.html", {"form": form})
