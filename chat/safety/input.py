"""Check untrusted user text once, the same way at every entry point.

`check_user_text` is the single gate for text a person typed (chat messages,
feedback comments, conversation titles). It either returns the cleaned text,
which is what gets stored, counted and sent to the model, or raises
`InvalidInput` whose `user_message` tells the user what to change.

The rules (refusals are decided on the text as sent, so the positions named
in their sentences match what the user typed):

1. The value must be a `str`; anything else (None, numbers, lists from a
   malformed JSON frame) is refused.
2. Absurdly long input is refused before any per-character work, so a
   multi-megabyte frame cannot buy CPU time (see `_SHRINK_FACTOR`).
3. Lone surrogates (U+D800-U+DFFF outside a valid pair) are refused: they are
   not text, cannot be encoded as UTF-8 and break the database and the model
   vendors' JSON encoders further down.
4. Line endings are unified: CRLF and a bare CR become LF, and the Unicode
   LINE / PARAGRAPH SEPARATORs (U+2028, U+2029) become LF too, because they
   end lines in some renderers and break JavaScript string literals in others.
5. C0 and C1 control characters (U+0000-U+001F, U+007F-U+009F) are refused,
   except TAB and LF. NUL in particular truncates strings in C libraries and
   PostgreSQL refuses it in text columns.
6. Bidirectional embedding, override and isolate controls (U+202A-U+202E and
   U+2066-U+2069) are refused, not stripped. They are the "Trojan Source"
   vector (CVE-2021-42574): they make text display in a different order than
   it is stored, so what staff see in the admin, what the model reads and what
   the user meant can differ. Silently stripping them would change the
   meaning of legitimate right-to-left text, so the user is asked to remove
   them. The implicit marks LRM, RLM and ALM (U+200E, U+200F, U+061C) are
   kept: they cannot reorder a run of text and right-to-left writers need
   them.
7. Invisible characters follow one deliberate rule:

   * ZERO WIDTH SPACE (U+200B), WORD JOINER (U+2060), the invisible math
     operators (U+2061-U+2064), the deprecated format controls
     (U+206A-U+206F), BYTE ORDER MARK / ZERO WIDTH NO-BREAK SPACE (U+FEFF),
     MONGOLIAN VOWEL SEPARATOR (U+180E) and SOFT HYPHEN (U+00AD) are always
     removed. They carry no meaning in a chat message, and they are how
     people hide words from filters ("ig<ZWSP>nore") or pad a message.
   * ZERO WIDTH JOINER (U+200D) and ZERO WIDTH NON-JOINER (U+200C) are kept
     only when they stand between two non-ASCII, non-space characters, and
     a run of several collapses to one. That keeps every emoji ZWJ sequence
     (👩‍💻, ❤️‍🔥, 🏳️‍🌈), Persian and Arabic ZWNJ ("می‌خواهم") and Indic
     conjunct control intact, and removes them wherever they can only be
     used to split ASCII words, at the start or end of the text, or next to
     whitespace.
   * Unicode TAG characters (U+E0000-U+E007F) are kept only inside a valid
     emoji tag sequence (a black flag, tags, CANCEL TAG: the flags of
     England, Scotland and Wales). Anywhere else they are removed, because
     they are invisible ASCII look-alikes used to smuggle hidden
     instructions to language models.
8. The text is normalised to NFC, so the same visible text is always stored
   as the same code points (caching, deduplication, length limits and the
   moderation patterns all rely on that).
9. Leading blank lines and trailing whitespace are trimmed; the indentation
   of the first non-blank line is kept, because pasted code depends on it.
10. Empty and whitespace-only text is refused.
11. The length limit counts code points of the cleaned text, i.e. exactly the
    string that is returned: `max_chars` characters are accepted,
    `max_chars + 1` are refused, and the sentence states the limit.
"""

from __future__ import annotations

import re
import unicodedata

from chat.safety.errors import InvalidInput

__all__ = ["InvalidInput", "check_frame_size", "check_user_text"]

# NFC can merge up to three code points into one (Hangul jamo L+V+T), CRLF
# halves, and invisible characters vanish, so text longer than this multiple
# of the limit cannot possibly fit and is refused before any real work.
_SHRINK_FACTOR = 4

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_CR = re.compile("\r\n?")
_LINE_SEPARATORS = re.compile("[\u2028\u2029]")
# CR is absent: it is converted to LF, not refused.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_BIDI_CONTROL = re.compile("[\u202a-\u202e\u2066-\u2069]")

_JOINERS = "\u200c\u200d"
_INVISIBLE_RUN = re.compile("[\u00ad\u180e\u200b\u2060-\u2064\u206a-\u206f\ufeff" + _JOINERS + "]+")
# Group 1 is a complete emoji tag sequence (kept); the rest are stray tags.
_TAGS = re.compile("(\U0001f3f4[\U000e0020-\U000e007e]+\U000e007f)|[\U000e0000-\U000e007f]+")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t\f\v]*\n)+")


def check_user_text(text: object, *, max_chars: int, field: str = "message") -> str:
    """Return `text` cleaned by the rules in the module docstring.

    Raise `InvalidInput` with a sentence naming `field` ("Your message …",
    "Your comment …") when the text has to be changed by the user.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    if not isinstance(text, str):
        raise InvalidInput(
            f"Your {field} must be text. Type it and send it again.", reason="not_text"
        )
    if len(text) > max_chars * _SHRINK_FACTOR:
        raise _too_long(field, len(text), max_chars)

    # Surrogates, bidi controls, tags, invisible characters, line separators
    # and NFC concern only non-ASCII text: most messages skip those passes.
    ascii_only = text.isascii()
    if not ascii_only:
        surrogate = _LONE_SURROGATE.search(text)
        if surrogate is not None:
            raise InvalidInput(
                f"Your {field} contains a broken character that is not valid text "
                f"({_codepoint(surrogate.group())} at position {surrogate.start() + 1}). "
                "Retype that part and send it again.",
                reason="surrogate",
            )

    _refuse_controls(text, field, ascii_only=ascii_only)
    if "\r" in text:
        text = _CR.sub("\n", text)

    if not ascii_only:
        text = _TAGS.sub(_keep_tag_sequence, text)
        text = _INVISIBLE_RUN.sub(_keep_inner_joiner, text)
        text = unicodedata.normalize("NFC", text)
        text = _LINE_SEPARATORS.sub("\n", text)
    untrimmed = text
    text = _LEADING_BLANK_LINES.sub("", text).rstrip()

    if not text:
        if untrimmed:
            raise InvalidInput(
                f"Your {field} contains only spaces or line breaks. "
                "Type something and send it again.",
                reason="blank",
            )
        raise InvalidInput(
            f"Your {field} is empty. Type something and send it again.", reason="empty"
        )
    if len(text) > max_chars:
        raise _too_long(field, len(text), max_chars)
    return text


def check_frame_size(raw: str | bytes, *, max_bytes: int) -> None:
    """Refuse a raw WebSocket frame or request body larger than `max_bytes`.

    Text is measured in UTF-8 bytes, which is what crossed the wire. Run this
    before parsing JSON so an oversized frame costs no parsing.
    """
    if max_bytes < 1:
        raise ValueError("max_bytes must be at least 1")
    if isinstance(raw, bytes):
        size = len(raw)
    elif len(raw) * 4 <= max_bytes:
        # No code point takes more than four bytes; skip the encode.
        return
    elif len(raw) > max_bytes:
        size = len(raw)
    else:
        # "surrogatepass" so a frame with a lone surrogate is still measured;
        # check_user_text refuses it later with a better sentence.
        size = len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidInput(
            f"That request is too large: it is {size:,} bytes and the limit is "
            f"{max_bytes:,}. Send a shorter message.",
            reason="frame_too_large",
        )


def _refuse_controls(text: str, field: str, *, ascii_only: bool) -> None:
    control = _CONTROL.search(text)
    if control is not None:
        char = control.group()
        what = "a null character" if char == "\x00" else "an invisible control character"
        raise InvalidInput(
            f"Your {field} contains {what} ({_codepoint(char)} at position "
            f"{control.start() + 1}) that can't be sent. Remove it and send it again.",
            reason="control_char",
        )
    bidi = None if ascii_only else _BIDI_CONTROL.search(text)
    if bidi is not None:
        char = bidi.group()
        raise InvalidInput(
            f"Your {field} contains an invisible text-direction control "
            f"({_codepoint(char)} {unicodedata.name(char)} at position {bidi.start() + 1}), "
            "which can make text look different from what it says. "
            "Remove it and send it again.",
            reason="bidi_control",
        )


def _keep_tag_sequence(match: re.Match[str]) -> str:
    return match.group(1) or ""


def _keep_inner_joiner(match: re.Match[str]) -> str:
    joiner = next((char for char in match.group() if char in _JOINERS), None)
    if joiner is None:
        return ""
    text, start, end = match.string, match.start(), match.end()
    before = text[start - 1] if start > 0 else ""
    after = text[end] if end < len(text) else ""
    if _joinable(before) and _joinable(after):
        return joiner
    return ""


def _joinable(char: str) -> bool:
    return char != "" and ord(char) > 0x7F and not char.isspace()


def _codepoint(char: str) -> str:
    return f"U+{ord(char):04X}"


def _too_long(field: str, length: int, max_chars: int) -> InvalidInput:
    return InvalidInput(
        f"Your {field} is too long: it has {length:,} characters and the limit is "
        f"{max_chars:,}. Shorten it and send it again.",
        reason="too_long",
    )
