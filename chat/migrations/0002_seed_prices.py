"""Seed list prices (USD per million tokens) for popular OpenAI and Anthropic models.

Staff keep them current in the admin by adding a row with a later
`effective_from`; replies keep the price in force when they were made.
Reversing removes only the rows seeded here.
"""

from datetime import UTC, datetime
from decimal import Decimal

from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import StateApps

SEEDED_FROM = datetime(2025, 1, 1, tzinfo=UTC)

# model, input, output, cached input (None where the vendor has no cached rate)
PRICES = [
    ("openai:gpt-5", "1.25", "10.00", "0.125"),
    ("openai:gpt-5-mini", "0.25", "2.00", "0.025"),
    ("openai:gpt-5-nano", "0.05", "0.40", "0.005"),
    ("openai:gpt-4.1", "2.00", "8.00", "0.50"),
    ("openai:gpt-4.1-mini", "0.40", "1.60", "0.10"),
    ("openai:gpt-4.1-nano", "0.10", "0.40", "0.025"),
    ("openai:gpt-4o", "2.50", "10.00", "1.25"),
    ("openai:gpt-4o-mini", "0.15", "0.60", "0.075"),
    ("openai:o3", "2.00", "8.00", "0.50"),
    ("openai:o4-mini", "1.10", "4.40", "0.275"),
    ("openai:o3-mini", "1.10", "4.40", "0.55"),
    ("openai:gpt-3.5-turbo", "0.50", "1.50", None),
    ("anthropic:claude-opus-4-5", "5.00", "25.00", "0.50"),
    ("anthropic:claude-opus-4-1", "15.00", "75.00", "1.50"),
    ("anthropic:claude-opus-4-0", "15.00", "75.00", "1.50"),
    ("anthropic:claude-opus-4", "15.00", "75.00", "1.50"),
    ("anthropic:claude-sonnet-4-5", "3.00", "15.00", "0.30"),
    ("anthropic:claude-sonnet-4-0", "3.00", "15.00", "0.30"),
    ("anthropic:claude-sonnet-4", "3.00", "15.00", "0.30"),
    ("anthropic:claude-3-7-sonnet", "3.00", "15.00", "0.30"),
    ("anthropic:claude-haiku-4-5", "1.00", "5.00", "0.10"),
    ("anthropic:claude-3-5-haiku", "0.80", "4.00", "0.08"),
    ("anthropic:claude-3-haiku", "0.25", "1.25", "0.03"),
]


def seed(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    Price = apps.get_model("chat", "Price")
    for model, input_price, output_price, cached in PRICES:
        Price.objects.get_or_create(
            model=model,
            effective_from=SEEDED_FROM,
            defaults={
                "input_per_mtok": Decimal(input_price),
                "output_per_mtok": Decimal(output_price),
                "cached_input_per_mtok": Decimal(cached) if cached is not None else None,
            },
        )


def unseed(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    Price = apps.get_model("chat", "Price")
    Price.objects.filter(model__in=[row[0] for row in PRICES], effective_from=SEEDED_FROM).delete()


class Migration(migrations.Migration):
    dependencies = [("chat", "0001_initial")]

    operations = [migrations.RunPython(seed, unseed)]
