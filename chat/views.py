from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.contrib.auth.forms import UserCreationForm
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.request import RawPostDataException
from django.shortcuts import redirect, render
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.http import require_GET, require_http_methods

from chat import adopt, selectors, services
from chat.errors import ChatError, Forbidden, InvalidInput
from chat.owners import Owner
from chat.safety.errors import InvalidInput as TextRefused
from chat.safety.input import check_frame_size
from feedback.selectors import ratings_for


def owner_of(request: HttpRequest) -> Owner | None:
    if request.user.is_authenticated:
        return Owner(user_id=request.user.pk)
    if not settings.CHAT_ALLOW_ANONYMOUS or not request.session.session_key:
        return None
    return Owner(user_id=None, session_key=request.session.session_key)


def error_response(exc: ChatError) -> JsonResponse:
    """Return the error as JSON; a wait that is known goes in the body and `Retry-After`."""
    error: dict[str, object] = {"code": exc.code, "message": exc.user_message}
    wait = exc.frame().get("retry_after")
    if wait is not None:
        error["retry_after"] = wait
    response = JsonResponse({"error": error}, status=exc.http_status)
    if wait is not None:
        response["Retry-After"] = str(wait)
    return response


@require_GET
@ensure_csrf_cookie
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
            "page_config": page_config(),
        },
    )


def page_config() -> dict[str, Any]:
    """Return the operator settings the page script reads (rendered with json_script)."""
    return {
        "reasons_up": list(settings.FEEDBACK_REASONS_UP),
        "reasons_down": list(settings.FEEDBACK_REASONS_DOWN),
        "comment_max_chars": settings.FEEDBACK_MAX_COMMENT_CHARS,
        # Markdown images load only from these hosts; any other image is shown
        # as a link, never fetched (an image URL can carry data out).
        # The CSP's img-src lists the same hosts (CHAT_IMAGE_HOSTS).
        "image_hosts": [str(h).lower() for h in settings.CHAT_IMAGE_HOSTS],
        "primary_model": settings.CHAT_MODEL,
    }


@require_GET
def conversations(request: HttpRequest) -> JsonResponse:
    owner = owner_of(request)
    if owner is None:
        return error_response(Forbidden("Please sign in to see your conversations."))
    try:
        page = selectors.conversation_search(
            owner=owner, query=request.GET.get("q", ""), cursor=request.GET.get("cursor", "")
        )
    except ChatError as exc:
        return error_response(exc)
    return JsonResponse(page)


@require_http_methods(["PATCH", "DELETE"])
def conversation_detail(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """Rename (PATCH {"title"}) or delete (DELETE) one of the caller's conversations."""
    owner = owner_of(request)
    if owner is None:
        return error_response(Forbidden("Please sign in to change your conversations."))
    try:
        if request.method == "DELETE":
            services.conversation_delete(owner=owner, conversation_id=conversation_id)
            return HttpResponse(status=204)
        title = check_json_object(request).get("title")
        conversation = services.conversation_rename(
            owner=owner, conversation_id=conversation_id, title=title
        )
    except ChatError as exc:
        return error_response(exc)
    return JsonResponse({"id": conversation.pk, "title": conversation.title, "titled": True})


def check_json_object(request: HttpRequest) -> dict[str, Any]:
    """Return the request body's JSON object, or raise InvalidInput saying what is wrong.

    Every JSON-reading view calls this, so a hostile body gets the same 400
    everywhere. The size is checked before parsing, so an oversized body
    costs no parsing. RecursionError is caught with the parse errors: a body
    nested a few thousand levels deep (`[[[[…`) is small enough to pass the
    size check, and the parser gives up on it with RecursionError, not
    ValueError.
    """
    try:
        raw = request.body
    except RawPostDataException:
        # A form POST: the CSRF check has already read it as form data.
        raise InvalidInput("The request body must be JSON, not a form.") from None
    try:
        check_frame_size(raw, max_bytes=settings.CHAT_MAX_FRAME_BYTES)
    except TextRefused as exc:
        raise InvalidInput(exc.user_message) from None
    try:
        # Invalid UTF-8 raises UnicodeDecodeError, a ValueError.
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidInput("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidInput("The request body must be a JSON object.")
    return body


@require_GET
def conversation_messages(request: HttpRequest, conversation_id: int) -> JsonResponse:
    owner = owner_of(request)
    if owner is None:
        return error_response(Forbidden("Please sign in to see your conversations."))
    try:
        messages = selectors.conversation_messages(owner=owner, conversation_id=conversation_id)
    except ChatError as exc:
        return error_response(exc)
    reply_ids = [m["id"] for m in messages if m["role"] == "assistant"]
    ratings = ratings_for(owner=owner, message_ids=reply_ids)
    fallbacks = selectors.reply_fallbacks(owner=owner, message_ids=reply_ids)
    for message in messages:
        if message["role"] == "assistant":
            message["feedback"] = ratings.get(message["id"])
            message["fallback"] = message["id"] in fallbacks
    return JsonResponse({"conversation": conversation_id, "messages": messages})


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    form: UserCreationForm[Any] = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        # The chats they had before signing up are kept (chat/adopt.py).
        adopt.login_keeping_chats(
            request, user, backend="django.contrib.auth.backends.ModelBackend"
        )
        return redirect("chat:index")
    return render(request, "registration/signup.html", {"form": form})
