"""An anonymous visitor who signs up or signs in keeps the chats they just had.

Anonymous conversations belong to a Django session (chat/owners.py). Signing
in gives the session a new key and deletes the old one, so without this the
visitor's conversations, and their ratings, were out of their reach the
moment they made an account. Here the sign-in and the hand-over happen in
one transaction: the conversations of the session that signed in become the
account's, with their messages' idempotency keys and their ratings.

Which session is adopted, and why only that one:
- Only the session this very request carries, loaded from the session
  store before Django replaces it: never a key named in a form field, a
  header or a cookie that matches no stored session (forged, expired, or an
  old one read from somewhere), so nobody can claim another visitor's
  chats, nor push theirs into someone else's account, without holding that
  visitor's live session cookie (which already is that visitor).
- Only an anonymous session: one already signed in has nothing anonymous.
- The wiring is in the sign-in and sign-up views, not Django's
  `user_logged_in` signal: the signal fires after the key has changed and
  the old session row is gone, so it could only trust the cookie's word for
  which session that was. Staff signing in to the admin keep their
  anonymous chats where they were.

A session planted in a victim's browser (session fixation) is the one case
left: whoever can set cookies for this site can make a victim's sign-in
adopt the planted session's chats. The key changes at sign-in all the same,
so the planter loses that session and sees nothing of the account, and the
sockets still open under it are closed (chat/signout.py) so they cannot go
on as its owner. Production keeps cookies on HTTPS with HSTS for
subdomains, which is what stops the planting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import SESSION_KEY, get_user, login
from django.db import transaction
from django.http import HttpRequest

from chat import signout
from chat.models import Conversation, Message
from chat.owners import Owner
from feedback.models import Feedback
from feedback.services import feedback_owner_key

logger = logging.getLogger(__name__)

# Conversations handed over per round of statements: a visitor with thousands
# of them signs in with a few statements per page, never one per row.
ADOPT_PAGE = 500


@dataclass(frozen=True, slots=True)
class Adopted:
    conversations: int = 0
    messages: int = 0
    feedback: int = 0
    # Messages whose client_msg_id the account already used, which lost it.
    ids_cleared: int = 0


def anonymous_session_key(request: HttpRequest) -> str | None:
    """Return the key of the stored anonymous session this request carries, or None."""
    session = request.session
    # Asking about its contents loads it: a key with no stored session
    # (forged, expired, deleted) is forgotten, and session_key is then None.
    names_a_user = SESSION_KEY in session
    # Anonymous is what the request was served as (chat.views.owner_of), not
    # whether the session names a user: one whose account was deleted
    # elsewhere or deactivated still names it, and its visitor has chatted
    # anonymously since, under this session.
    user = getattr(request, "user", None)
    if user is None:
        user = get_user(request) if names_a_user else None
    if user is not None and user.is_authenticated:
        return None
    return session.session_key or None


def login_keeping_chats(request: HttpRequest, user: Any, backend: str | None = None) -> Adopted:
    """Sign the user in; the anonymous session's conversations become theirs.

    The views call this instead of `django.contrib.auth.login`.
    """
    previous = request.session.session_key if SESSION_KEY in request.session else None
    anonymous = anonymous_session_key(request)
    adopted = Adopted()
    # Signing in deletes the anonymous session: its chats change hands in
    # the same transaction, or the sign-in fails with nothing moved.
    with transaction.atomic():
        login(request, user, backend=backend)
        if anonymous:
            adopted = conversations_adopt(session_key=anonymous, user_id=user.pk)
        replaced = anonymous or previous
        if replaced and replaced != request.session.session_key:
            # Its open sockets reconnect, as the account, once it is saved.
            transaction.on_commit(lambda: signout.session_rekeyed(replaced), robust=True)
    if adopted.conversations:
        logger.info(
            "sign-in kept %d anonymous conversation(s), %d rating(s); %d send id(s) cleared",
            adopted.conversations,
            adopted.feedback,
            adopted.ids_cleared,
        )
    return adopted


def conversations_adopt(*, session_key: str, user_id: int, page: int = ADOPT_PAGE) -> Adopted:
    """Give the account every conversation of the anonymous session; run it in a transaction.

    The conversations keep their ids, titles and order; their messages'
    idempotency keys and the session's ratings of their replies go to the
    account, so a send retried after signing in is still answered once and
    the thumbs stay pressed. Safe to run twice: what moved no longer
    matches the session. Rate-limit and budget counters stay where they
    are (they expire by themselves).
    """
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("conversations_adopt writes several statements: run it in a transaction")
    anonymous = Owner(user_id=None, session_key=session_key)
    account = Owner(user_id=user_id)
    if not session_key:
        return Adopted()
    anonymous_rater, account_rater = feedback_owner_key(anonymous), feedback_owner_key(account)
    conversations = messages = feedback = cleared = 0
    while True:
        # Each page leaves the session once moved, so the next query finds
        # the next page; locked, so a concurrent sign-in of the same session
        # (a double submit) finds them gone rather than moving them twice.
        ids = list(
            Conversation.objects.select_for_update()
            .filter(anonymous.conversation_filter())
            .values_list("pk", flat=True)[:page]
        )
        if not ids:
            break
        sent = Message.objects.filter(conversation_id__in=ids, owner_key=anonymous.key)
        # client_msg_id is unique per owner, and clients choose it: the
        # account may already have used one of these (another browser, a
        # buggy or hostile client). The account's own send keeps its id; the
        # moved one loses it, which only means a retry of it is not
        # recognised. Every other moved send keeps its id, so a tab that
        # resends after reconnecting as the account is still answered once.
        cleared += sent.filter(
            client_msg_id__in=Message.objects.filter(
                owner_key=account.key, client_msg_id__isnull=False
            ).values("client_msg_id")
        ).update(client_msg_id=None)
        messages += sent.update(owner_key=account.key)
        # One rating per owner and reply: the account cannot have rated a
        # reply in a conversation that was not its own, but if it had, its
        # rating would win and the session's would stay behind.
        already = Feedback.objects.filter(
            owner_key=account_rater, message__conversation_id__in=ids
        ).values("message_id")
        feedback += (
            Feedback.objects.filter(owner_key=anonymous_rater, message__conversation_id__in=ids)
            .exclude(message_id__in=already)
            .update(owner_key=account_rater, user_id=user_id)
        )
        moved = Conversation.objects.filter(anonymous.conversation_filter(), pk__in=ids).update(
            user_id=user_id, session_key=""
        )
        conversations += moved
        if moved == 0:  # nothing left to take: never loop on the same page
            break
    return Adopted(
        conversations=conversations, messages=messages, feedback=feedback, ids_cleared=cleared
    )
