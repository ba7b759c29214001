from celery import shared_task

from chat import services


@shared_task(ignore_result=True)
def conversation_title(conversation_id: int) -> None:
    """Title a new conversation off the request path (idempotent)."""
    services.conversation_title_generate(conversation_id=conversation_id)


@shared_task(ignore_result=True)
def conversation_titles(conversation_ids: list[int]) -> None:
    """Title new conversations, enqueued together when they start together."""
    for conversation_id in conversation_ids:
        services.conversation_title_generate(conversation_id=conversation_id)
