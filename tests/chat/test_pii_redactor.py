"""The PII redactor: accuracy over the labelled set, placeholders, overlaps, structures.

`data/pii_labelled.tsv` holds one `label<TAB>text` per line; the label is a
comma-separated list of the kinds the line contains, or `none`. Every value in
it is fake: 555-01xx and Ofcom drama phone ranges or libphonenumber's example
numbers, example.* domains, published test card numbers and IBANs, generated
ids with valid check digits, and random token-shaped strings. It was written
alongside the redactor, so it guards against regressions; it does not measure
accuracy on real traffic.
"""

from __future__ import annotations

import time
from collections import Counter, namedtuple
from pathlib import Path

import pytest

from chat.safety import PiiMatch, find_pii, redact, redact_obj
from chat.safety import pii as pii_module

DATA = Path(__file__).parent / "data" / "pii_labelled.tsv"
KINDS = ("EMAIL", "PHONE", "CARD", "IBAN", "NATIONAL_ID", "IP", "SECRET")
MIN_RECALL = 0.95
MIN_PRECISION = 0.95


def load_labelled() -> list[tuple[frozenset[str], str]]:
    rows = []
    for number, line in enumerate(DATA.read_text(encoding="utf-8").splitlines(), start=1):
        if not line or line.startswith("#"):
            continue
        label, text = line.split("\t", 1)
        kinds = frozenset() if label == "none" else frozenset(label.split(","))
        assert kinds <= set(KINDS), f"line {number}: unknown kind in {label!r}"
        rows.append((kinds, text))
    return rows


LABELLED = load_labelled()


def ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 1.0


# --- Accuracy over the labelled set ------------------------------------------


def test_labelled_set_is_big_and_varied_enough_to_mean_something() -> None:
    assert len(LABELLED) >= 240
    assert sum(1 for kinds, _ in LABELLED if not kinds) >= 80
    per_kind = Counter(kind for kinds, _ in LABELLED for kind in kinds)
    assert all(per_kind[kind] >= 15 for kind in KINDS), per_kind


def test_recall_and_precision_over_the_labelled_set() -> None:
    """Count a line-level match per kind; print the table; demand 0.95 / 0.95."""
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    mistakes: list[str] = []
    for expected, text in LABELLED:
        found: set[str] = {match.kind for match in find_pii(text)}
        for kind in expected & found:
            tp[kind] += 1
        for kind in found - expected:
            fp[kind] += 1
            mistakes.append(f"  false positive {kind:<11} {text!r} -> {redact(text)!r}")
        for kind in expected - found:
            fn[kind] += 1
            mistakes.append(f"  missed         {kind:<11} {text!r} -> {redact(text)!r}")

    header = f"{'kind':<12}{'TP':>5}{'FP':>5}{'FN':>5}{'precision':>11}{'recall':>8}"
    lines = ["", f"PII redactor on {DATA.name} ({len(LABELLED)} lines)", header, "-" * len(header)]
    for kind in (*KINDS, "overall"):
        if kind == "overall":
            lines.append("-" * len(header))
            t, f_pos, f_neg = sum(tp.values()), sum(fp.values()), sum(fn.values())
        else:
            t, f_pos, f_neg = tp[kind], fp[kind], fn[kind]
        lines.append(
            f"{kind:<12}{t:>5}{f_pos:>5}{f_neg:>5}"
            f"{ratio(t, t + f_pos):>11.3f}{ratio(t, t + f_neg):>8.3f}"
        )
    print("\n".join(lines + mistakes))

    total_tp = sum(tp.values())
    recall = ratio(total_tp, total_tp + sum(fn.values()))
    precision = ratio(total_tp, total_tp + sum(fp.values()))
    assert recall >= MIN_RECALL, f"recall {recall:.3f}\n" + "\n".join(mistakes)
    assert precision >= MIN_PRECISION, f"precision {precision:.3f}\n" + "\n".join(mistakes)


def test_redacting_twice_changes_nothing_more() -> None:
    """Placeholders themselves are never mistaken for personal data."""
    for _, text in LABELLED:
        once = redact(text)
        assert redact(once) == once


# --- Placeholders and spans --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (
            "Call me at (202) 555-0143 or mail jane.doe@example.com.",
            "Call me at [PHONE] or mail [EMAIL].",
        ),
        ("Pay with 4111 1111 1111 1111, exp 12/27.", "Pay with [CARD], exp 12/27."),
        ("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN [IBAN] please"),
        ("My SSN is 536-90-4399.", "My SSN is [NATIONAL_ID]."),
        ("Blocked 203.0.113.42 and 2001:db8::8a2e:370:7334", "Blocked [IP] and [IP]"),
        ("Authorization: Bearer abcdefghijklmnop1234", "Authorization: Bearer [SECRET]"),
        ("DB_PASSWORD=Sup3r-S3cret", "DB_PASSWORD=[SECRET]"),
        ("postgres://app:s3cr3t@db.example.com/app", "postgres://app:[SECRET]@db.example.com/app"),
    ],
)
def test_redaction_keeps_the_sentence_readable(text: str, redacted: str) -> None:
    assert redact(text) == redacted


def test_find_pii_returns_typed_spans_in_order() -> None:
    text = "mail a@example.com or call +44 20 7946 0958"
    assert find_pii(text) == [PiiMatch("EMAIL", 5, 18), PiiMatch("PHONE", 27, 43)]
    assert text[27:43] == "+44 20 7946 0958"


def test_text_without_pii_is_returned_as_is() -> None:
    text = "Nothing to see here, just a question about sourdough."
    assert redact(text) is text
    assert find_pii("") == []


@pytest.mark.parametrize(
    "text",
    [
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nabc\n-----END RSA PRIVATE KEY-----",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA (cut off here",
    ],
)
def test_private_key_blocks_are_redacted_whole_even_when_cut_off(text: str) -> None:
    assert redact(f"key:\n{text}") == "key:\n[SECRET]"


# --- True negatives named in the contract ------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Where is order #A-1234567?",
        "Invoice INV-2024-000123 is overdue",
        "Meeting on 2024-05-01 at 10:30:45",
        "Deadline 01/05/2024 17:00",
        "Python 3.11.4 and version 1.2.3.4",
        "It costs $1,299.99 (or 1.234,56 €)",
        "ZIP 94103-1234 and 10115 Berlin",
        "ISBN 978-3-16-148410-0",
        "Tracking 1Z999AA10123456784",
        "Random 4111111111111112 fails Luhn",
        "2^32 = 4294967296",
        "The answer is 1234567890, counted 9876543210 rows",
        "localhost 127.0.0.1 and ::1",
        "password = os.environ['DB_PASSWORD']",
        "my password is too short",
    ],
)
def test_look_alikes_are_left_alone(text: str) -> None:
    assert find_pii(text) == []


def test_dotted_quad_is_a_version_after_a_version_word_and_an_address_otherwise() -> None:
    assert redact("upgrade to version 1.2.3.4") == "upgrade to version 1.2.3.4"
    assert redact("firmware v 10.2.0.1") == "firmware v 10.2.0.1"
    assert redact("the server is 1.2.3.4") == "the server is [IP]"


# --- Overlaps ----------------------------------------------------------------


def test_longest_find_wins_an_overlap() -> None:
    # The phone matcher also sees digits inside the IBAN; the IBAN is longer.
    assert redact("GB82 WEST 1234 5698 7654 32") == "[IBAN]"
    # An e-mail address whose local part is a phone number stays an address.
    assert redact("4155550132@example.com") == "[EMAIL]"


def test_more_specific_kind_wins_a_tie() -> None:
    # Same span seen as card and as secret value: the secret wins.
    assert find_pii("password=4111111111111111") == [PiiMatch("SECRET", 9, 25)]
    # Same span seen as phone (NANP) and as NHS number: the id wins.
    assert find_pii("NHS number 943 476 5919") == [PiiMatch("NATIONAL_ID", 11, 23)]


def test_overlap_resolution_is_deterministic() -> None:
    text = "ssh deploy@203.0.113.9 with password=Winter2024! or card 5555 5555 5555 4444"
    results = {tuple(find_pii(text)) for _ in range(5)}
    assert len(results) == 1


# --- Structures --------------------------------------------------------------


Frame = namedtuple("Frame", ["filename", "vars"])


def test_redact_obj_walks_nested_structures_and_leaves_other_values() -> None:
    event = {
        "message": "user jane@example.com failed",
        "extra": {"attempts": 3, "ok": False, "ratio": 0.5, "none": None},
        "breadcrumbs": [{"data": ("call +1 202 555 0143", b"raw bytes")}],
        "tags": {"ip 203.0.113.7"},
        "frames": [Frame("app.py", {"card": "4111 1111 1111 1111"})],
    }
    assert redact_obj(event) == {
        "message": "user [EMAIL] failed",
        "extra": {"attempts": 3, "ok": False, "ratio": 0.5, "none": None},
        "breadcrumbs": [{"data": ("call [PHONE]", b"raw bytes")}],
        "tags": {"ip [IP]"},
        "frames": [Frame("app.py", {"card": "[CARD]"})],
    }
    assert event["message"] == "user jane@example.com failed", "input must not be mutated"


@pytest.mark.parametrize(
    "key",
    ["password", "DB_PASSWORD", "api_key", "apiKey", "Authorization", "Cookie", "X-CSRFToken"],
)
def test_strings_under_credential_keys_are_replaced_whole(key: str) -> None:
    assert redact_obj({key: "plain words", "user": "plain words"}) == {
        key: "[SECRET]",
        "user": "plain words",
    }


def test_keys_that_merely_mention_tokens_are_not_credentials() -> None:
    record = {"prompt_tokens": 12, "tokenizer": "cl100k_base", "author": "Jane"}
    assert redact_obj(record) == record


def test_redact_obj_survives_cycles_and_deep_nesting() -> None:
    cyclic: list[object] = ["mail a@example.com"]
    cyclic.append(cyclic)
    assert redact_obj(cyclic) == ["mail [EMAIL]", "[TRUNCATED]"]

    deep: object = "call +44 20 7946 0958"
    for _ in range(100):
        deep = [deep]
    assert "[TRUNCATED]" in repr(redact_obj(deep))


# --- Speed -------------------------------------------------------------------


def test_phonenumbers_is_not_called_without_seven_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise AssertionError("PhoneNumberMatcher should not run")

    monkeypatch.setattr(pii_module, "PhoneNumberMatcher", explode)
    assert redact("order 12345 shipped on 2024-05 for $1,299, mail a@example.com") == (
        "order 12345 shipped on 2024-05 for $1,299, mail [EMAIL]"
    )


def test_typical_messages_are_redacted_quickly() -> None:
    texts = [text for _, text in LABELLED]
    started = time.perf_counter()
    for text in texts:
        redact(text)
    per_message = (time.perf_counter() - started) / len(texts)
    assert per_message < 0.005, f"{per_message * 1000:.2f} ms per message"

    long_prose = "The quick brown fox jumps over the lazy dog at 10:30 on 2024-05-01. " * 60
    started = time.perf_counter()
    redact(long_prose)
    assert time.perf_counter() - started < 0.1


def test_log_timestamps_are_not_phone_numbers() -> None:
    line = "2024-05-01 10:30:00,123 INFO user 42 logged in from 203.0.113.5"
    assert redact(line) == "2024-05-01 10:30:00,123 INFO user 42 logged in from [IP]"


@pytest.mark.parametrize(
    "text",
    [
        "1 " * 5000,
        "1." * 5000,
        "2024-05-01 10:30, " * 560,
        "2024-05-01 2024-06-02 " * 450,
        "12 " * 3300,
    ],
)
def test_digit_heavy_text_costs_bounded_time(text: str) -> None:
    started = time.perf_counter()
    redacted = redact(text)
    assert time.perf_counter() - started < 0.5
    if not text.startswith("12 "):
        # Past the phone budget "12 12 12 …" may be over-redacted; lists of
        # single digits and timestamps never look like phone numbers.
        assert "[PHONE]" not in redacted
