"""Find and redact personal data and secrets in free text.

`redact(text)` replaces every find with a typed placeholder so the sentence
stays readable ("call me on [PHONE]"); `find_pii(text)` returns the finds;
`redact_obj(obj)` walks dicts, lists, tuples and sets (Sentry events, log
records, exported feedback) and redacts every string in them.

Kinds and how each is confirmed
-------------------------------
Shape alone produces too many false alarms on order numbers, dates and
prices, so every kind is confirmed by something stronger than a regex:

* ``EMAIL``: address syntax with a letters-only top-level domain.
* ``PHONE``: ``phonenumbers.PhoneNumberMatcher``. "+"-prefixed numbers are
  accepted when their length is possible for the country code (the drama and
  test ranges fail full validation); national numbers must be valid and
  grouped the way that country writes them (US, GB, DE, FR, IN, BR, ES, NL,
  IT). A bare digit run with no separators counts only after a word such as
  "call" or "phone"; a number right after "order", "invoice", "#" and the
  like, and the US ZIP+4 and SSN shapes, never count.
* ``CARD``: 13-19 digits, written contiguously or in the usual 4-4-4-4 /
  4-6-5 groups, with a known issuer prefix and a valid Luhn check digit.
* ``IBAN``: ``stdnum.iban`` (ISO 7064 check digits and the country's BBAN
  format).
* ``NATIONAL_ID``: validated by ``python-stdnum``: US SSN (dashed; the
  undashed form needs the word "SSN" nearby), UK National Insurance number
  (HMRC prefix rules, no check digit exists), UK NHS number, German tax id
  (Steuer-ID), French NIR, Spanish DNI and NIE, Dutch BSN, Indian Aadhaar
  and PAN, Brazilian CPF and Italian codice fiscale. Numbers whose checksum
  is weak (NHS, Steuer-ID, BSN, unformatted Aadhaar and CPF) also need their
  name nearby.
* ``IP``: IPv4 and IPv6 addresses accepted by ``ipaddress``. Loopback and
  unspecified addresses (127.0.0.1, 0.0.0.0, ::1, ::) identify nobody and
  are left alone. A dotted quad right after a version or section word
  ("version", "v", "release", "build", "firmware", "section", "§" …) is a
  version or section number, not an address, and is left alone too;
  anywhere else "1.2.3.4" is an address, because guessing otherwise would
  let real addresses through.
* ``SECRET``: API keys and tokens by their documented prefixes (OpenAI
  ``sk-``, Anthropic ``sk-ant-``, AWS ``AKIA``/``ASIA``, GitHub ``ghp_`` …,
  Slack ``xox?-``, Google ``AIza``, Stripe, GitLab, Hugging Face, npm), JWTs,
  PEM private-key blocks (also when cut off), the token after ``Bearer`` and
  ``Authorization: Basic``, the password in ``scheme://user:password@host``,
  the value in ``password=…`` / ``api_key: …`` assignments (not when the
  value is plainly code, like ``os.environ[…]`` or ``${VAR}``), and "my
  password is …" when what follows looks like a password.

Overlaps are resolved deterministically: the longest find wins; on equal
length the more specific kind wins, in the order SECRET, EMAIL, IBAN, CARD,
NATIONAL_ID, IP, PHONE; then the earlier one.

Speed: every regex is compiled once, detectors skip text that cannot
contain their kind (no "@", too few digits), and ``phonenumbers``, by far the
slowest step, runs only when the text holds a run of at least seven digits
and only on the candidate numbers themselves. Past 32 candidates in one text
the rest are redacted on shape alone, so a digit-heavy log line cannot buy
seconds of CPU.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar, cast

from phonenumbers import Leniency, PhoneNumberMatcher
from stdnum import iban, luhn
from stdnum.br import cpf
from stdnum.de import idnr
from stdnum.es import dni, nie
from stdnum.fr import nir
from stdnum.gb import nhs
from stdnum.in_ import aadhaar, pan
from stdnum.it import codicefiscale
from stdnum.nl import bsn
from stdnum.us import ssn

__all__ = ["PiiKind", "PiiMatch", "find_pii", "redact", "redact_obj"]

PiiKind = Literal["EMAIL", "PHONE", "CARD", "IBAN", "NATIONAL_ID", "IP", "SECRET"]

# Most specific first; used to break ties between finds of equal length.
_PRIORITY: dict[PiiKind, int] = {
    "SECRET": 0,
    "EMAIL": 1,
    "IBAN": 2,
    "CARD": 3,
    "NATIONAL_ID": 4,
    "IP": 5,
    "PHONE": 6,
}

_DIGIT = re.compile(r"\d")
# Seven digits with at most short separators between them: the least a phone
# number or card needs, and the gate in front of the slow phone matcher.
_LONG_DIGIT_RUN = re.compile(r"\d(?:[\s().\-/]{0,3}\d){6}")


@dataclass(frozen=True, slots=True)
class PiiMatch:
    kind: PiiKind
    start: int
    end: int


def find_pii(text: str) -> list[PiiMatch]:
    """Return the non-overlapping finds in `text`, ordered by position."""
    if not text:
        return []
    candidates: list[PiiMatch] = []
    candidates.extend(_find_secrets(text))
    if "@" in text:
        candidates.extend(_find_emails(text))
    # Every remaining kind but IPv6 contains a decimal digit, and most chat
    # messages have none.
    has_digit = _DIGIT.search(text) is not None
    if ":" in text or (has_digit and "." in text):
        candidates.extend(_find_ips(text))
    if has_digit:
        candidates.extend(_find_ibans(text))
        candidates.extend(_find_national_ids(text))
        if _LONG_DIGIT_RUN.search(text):
            candidates.extend(_find_cards(text))
            candidates.extend(_find_phones(text))
    return _resolve(candidates)


def redact(text: str) -> str:
    """Return `text` with every find replaced by its placeholder, e.g. ``[EMAIL]``."""
    matches = find_pii(text)
    if not matches:
        return text
    parts: list[str] = []
    position = 0
    for match in matches:
        parts.append(text[position : match.start])
        parts.append(f"[{match.kind}]")
        position = match.end
    parts.append(text[position:])
    return "".join(parts)


_T = TypeVar("_T")
_MAX_DEPTH = 32


def redact_obj(obj: _T) -> _T:
    """Return a copy of `obj` with every string in it redacted.

    Dicts, lists, tuples (named tuples too), sets and frozensets are walked;
    other objects are returned as they are. A string stored under a key that
    names a credential ("password", "api_key", "Authorization", "Cookie" …)
    is replaced by ``[SECRET]`` whole, since its shape proves nothing. Keys
    themselves are not redacted: two keys could redact to the same
    placeholder and silently drop a value. Cycles and nesting deeper than
    32 levels become ``"[TRUNCATED]"`` instead of recursing forever.
    """
    return cast(_T, _redact_value(obj, depth=0, path=set()))


# --- Resolution --------------------------------------------------------------


def _resolve(candidates: list[PiiMatch]) -> list[PiiMatch]:
    ordered = sorted(set(candidates), key=lambda m: (m.start - m.end, _PRIORITY[m.kind], m.start))
    accepted: list[PiiMatch] = []
    for candidate in ordered:
        if all(candidate.end <= kept.start or candidate.start >= kept.end for kept in accepted):
            accepted.append(candidate)
    return sorted(accepted, key=lambda m: m.start)


# --- Secrets -----------------------------------------------------------------

# Each pattern either matches the secret whole or names it as group "secret",
# so "Bearer xyz" keeps the word Bearer and "password=xyz" keeps the key. The
# hints are substrings (of the lowercased text) without which the pattern
# cannot match; checking them first skips most patterns on ordinary text.
_TOKEN_PATTERNS: tuple[tuple[tuple[str, ...], re.Pattern[str]], ...] = (
    (
        ("-----begin",),
        re.compile(
            r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
            r".*?(?:-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)",
            re.DOTALL,
        ),
    ),
    (("sk-",), re.compile(r"(?<![\w-])sk-ant-[A-Za-z0-9_\-]{20,}")),
    (("sk-",), re.compile(r"(?<![\w-])sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}")),
    (
        ("akia", "asia", "abia", "acca", "agpa", "aida", "aroa", "aipa", "anpa", "anva", "apka"),
        re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{16}\b"),
    ),
    (
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}\b|\bgithub_pat_\w{22,255}"),
    ),
    (("xox",), re.compile(r"\bxox[abposre]-[A-Za-z0-9-]{10,}")),
    (("hooks.slack",), re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{20,}")),
    (("aiza",), re.compile(r"\bAIza[0-9A-Za-z_\-]{35}(?![\w-])")),
    (("ya29.",), re.compile(r"\bya29\.[0-9A-Za-z_\-]{20,}")),
    (("_live_", "_test_"), re.compile(r"\b(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}\b")),
    (("glpat-",), re.compile(r"\bglpat-[0-9A-Za-z_\-]{20,}")),
    (("npm_",), re.compile(r"\bnpm_[A-Za-z0-9]{36}\b")),
    (("hf_",), re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")),
    (("eyj",), re.compile(r"\beyJ[A-Za-z0-9_\-]{5,}\.eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]*")),
    (("bearer",), re.compile(r"(?i)\bbearer\s+(?P<secret>[A-Za-z0-9\-._~+/]{16,}=*)")),
    (
        ("authorization",),
        re.compile(r"(?i)\bauthorization\s*:\s*basic\s+(?P<secret>[A-Za-z0-9+/]{8,}={0,2})"),
    ),
    (("://",), re.compile(r"(?i)\b[a-z][a-z0-9+.\-]*://[^\s/:@]+:(?P<secret>[^\s/@]+)@")),
)

_CREDENTIAL_NAMES = (
    r"(?:password|passwd|passphrase|pwd|pass|secret|api[_-]?key|apikey|access[_-]?key|"
    r"access[_-]?token|auth[_-]?token|refresh[_-]?token|id[_-]?token|token|private[_-]?key|"
    r"client[_-]?secret|secret[_-]?key|credentials?)"
)
_ASSIGNMENT = re.compile(
    rf"(?i)(?<![\w-])[\"']?(?:[a-z0-9]+[_-])*{_CREDENTIAL_NAMES}[\"']?\s*(?P<op>=|:)\s*"
    r"(?:(?P<quote>[\"'])(?P<quoted>[^\"'\n]{1,200})(?P=quote)"
    r"|(?P<bare>[^\s\"',;&}\]]{1,200}))"
)
_SPOKEN_SECRET = re.compile(
    r"(?i)\b(?:my|the|our|his|her|their)\s+(?:\w+\s+)?"
    r"(?:password|passcode|passphrase|pin|api\s+key|token|secret\s+key)\s+(?:is|was|=|:)\s+"
    r"(?:(?P<quote>[\"'\u2018\u201c])(?P<quoted>[^\"'\u2019\u201d\n]{1,200})[\"'\u2019\u201d]"
    r"|(?P<bare>[^\s\"'\u201c\u201d]{4,200}))"
)
# Values that are references to a secret, not the secret: env lookups,
# template variables, masked values and obvious code.
_PLACEHOLDER_VALUE = re.compile(
    r"(?i)^(?:[$%{<\[(]|\*+$|x{3,}$|\.{3}|none$|null$|nil$|true$|false$|undefined$|"
    r"your[_-]|os\.|env\b|process\.env|getenv|settings\.|config\.|self\.|request\.)"
)
_CODE_REFERENCE = re.compile(r"^[a-z_][a-z0-9_]*[_.][a-z0-9_.]+$|[()\[\]]")
# Sentence punctuation after a bare value. "!" and "?" stay: they are common
# in passwords, and redacting one mark too many costs nothing.
_TRAILING_PUNCTUATION = ".,;:)"
# How a value was introduced: "key=value", "Key: value" or "my password is value".
_ValueStyle = Literal["assigned", "labelled", "spoken"]


def _find_secrets(text: str) -> Iterator[PiiMatch]:
    lowered = text.lower()
    for hints, pattern in _TOKEN_PATTERNS:
        if not any(hint in lowered for hint in hints):
            continue
        group = "secret" if "secret" in pattern.groupindex else 0
        for match in pattern.finditer(text):
            yield PiiMatch("SECRET", match.start(group), match.end(group))
    if "=" in text or ":" in text:
        for match in _ASSIGNMENT.finditer(text):
            style: _ValueStyle = "assigned" if match.group("op") == "=" else "labelled"
            span = _secret_value_span(match, style=style)
            if span is not None:
                yield PiiMatch("SECRET", *span)
    for match in _SPOKEN_SECRET.finditer(text):
        span = _secret_value_span(match, style="spoken")
        if span is not None:
            yield PiiMatch("SECRET", *span)


def _secret_value_span(match: re.Match[str], *, style: _ValueStyle) -> tuple[int, int] | None:
    if match.group("quoted") is not None:
        value, start = match.group("quoted"), match.start("quoted")
        if _PLACEHOLDER_VALUE.match(value):
            return None
        return start, start + len(value)
    value, start = match.group("bare"), match.start("bare")
    value = value.rstrip(_TRAILING_PUNCTUATION)
    if not value or _PLACEHOLDER_VALUE.match(value) or _CODE_REFERENCE.search(value):
        return None
    # An explicit "key=value" is taken at its word. "Token: the first word"
    # and "my password is incorrect" are prose, so a labelled or spoken value
    # must look like a credential: a PIN-like number or a mixed string.
    if style == "labelled" and not (len(value) >= 6 and not value.isalpha()):
        return None
    if style == "spoken" and not (
        (len(value) >= 4 and any(c.isdigit() for c in value))
        or (len(value) >= 6 and not value.isalpha())
    ):
        return None
    return start, start + len(value)


# --- E-mail ------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.%+-])\w[\w.%+'-]{0,63}@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.){1,8}[^\W\d_]{2,24}\b"
)


_URL_USER = re.compile(r"://[^\s/:@]+:$")


def _find_emails(text: str) -> Iterator[PiiMatch]:
    for match in _EMAIL.finditer(text):
        # "scheme://user:password@host" is a credential, not an address.
        if _URL_USER.search(text, max(0, match.start() - 80), match.start()):
            continue
        # "git@github.com:org/repo" is an scp-style remote, not a mailbox.
        if (
            text[match.end() : match.end() + 1] == ":"
            and not text[match.end() + 1 : match.end() + 2].isspace()
        ):
            continue
        yield PiiMatch("EMAIL", match.start(), match.end())


# --- IBAN --------------------------------------------------------------------

_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{1,4}){3,8}(?![A-Za-z0-9])")


def _find_ibans(text: str) -> Iterator[PiiMatch]:
    for match in _IBAN.finditer(text):
        # The greedy match may swallow a following word or number group;
        # drop trailing groups until the check digits agree.
        candidate = match.group()
        while len(candidate.replace(" ", "")) >= 15:
            # People type IBANs in lower case too; the check digits decide.
            if iban.is_valid(candidate.upper()):
                yield PiiMatch("IBAN", match.start(), match.start() + len(candidate))
                break
            if " " not in candidate:
                break
            candidate = candidate.rsplit(" ", 1)[0]


# --- Cards -------------------------------------------------------------------

# Either contiguous digits or groups joined by one consistent separator.
_CARD = re.compile(
    r"(?<![\w.,/+-])\d{4}(?:\d{9,15}|(?P<sep>[ -])\d{1,6}(?:(?P=sep)\d{1,6}){1,3})"
    r"(?![\w]|[.,/-]\d)"
)
_CARD_GROUPINGS = (
    (4, 4, 4, 4),
    (4, 4, 4, 4, 3),
    (4, 4, 4, 4, 2),
    (4, 4, 4, 4, 1),
    (4, 4, 4, 1),
    (4, 4, 4, 3),
    (4, 4, 4, 2),
    (4, 6, 5),
    (4, 6, 4),
    (4, 4, 5),
)
# Issuer identification numbers (leading digits) and lengths of the card
# networks in use: Visa, Mastercard (51-55 and 2221-2720), Amex, Discover,
# JCB, Diners, UnionPay, Mir (2200-2204) and the 50/56-69 debit ranges
# (Maestro, RuPay, Elo). A Luhn-valid number outside these is not a card.
_CARD_ISSUER = re.compile(
    r"^(?:4\d{12}(?:\d{3}){0,2}|5[1-5]\d{14}|2(?:2[2-9]\d|[3-6]\d\d|7[01]\d|720)\d{12}"
    r"|3[47]\d{13}|6(?:011|4[4-9]\d|5\d\d)\d{12,15}|35(?:2[89]|[3-8]\d)\d{12,15}"
    r"|3(?:0[0-5]|[689]\d)\d{11,16}|62\d{14,17}|(?:5[06-9]|6\d)\d{10,17}|220[0-4]\d{12,15})$"
)


def _find_cards(text: str) -> Iterator[PiiMatch]:
    for match in _CARD.finditer(text):
        separator = match.group("sep")
        if separator is None:
            if _is_card_number(match.group()):
                yield PiiMatch("CARD", match.start(), match.end())
            continue
        # "4111 1111 1111 1111 2024": drop trailing groups that belong to
        # the next number until the grouping is a card's.
        groups = match.group().split(separator)
        while len(groups) >= 3:
            if tuple(map(len, groups)) in _CARD_GROUPINGS and _is_card_number("".join(groups)):
                end = match.start() + len(separator.join(groups))
                yield PiiMatch("CARD", match.start(), end)
                break
            groups.pop()


def _is_card_number(digits: str) -> bool:
    return bool(_CARD_ISSUER.match(digits)) and luhn.is_valid(digits)


# --- National identity numbers -----------------------------------------------


@dataclass(frozen=True, slots=True)
class _IdRule:
    pattern: re.Pattern[str]
    is_valid: Callable[[str], bool]
    # When set, the number only counts if this matches just before it.
    context: re.Pattern[str] | None = None


def _context(words: str) -> re.Pattern[str]:
    return re.compile(rf"(?i)\b(?:{words})\b[^\n\d]{{0,25}}$")


def _nino_is_valid(number: str) -> bool:
    # HMRC never issues these prefixes, and D, F, I, Q, U, V are not used in
    # either letter (O not in the second); the regex enforces the letters.
    return number.replace(" ", "")[:2] not in {"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"}


_ID_RULES: tuple[_IdRule, ...] = (
    _IdRule(re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])"), ssn.is_valid),
    _IdRule(
        re.compile(r"(?<![\w-])\d{3} ?\d{2} ?\d{4}(?![\w-])"),
        lambda n: ssn.is_valid(n.replace(" ", "")),
        _context(r"ssn|social\s+security(?:\s+(?:number|no\.?|#))?"),
    ),
    _IdRule(
        re.compile(
            r"(?<![A-Za-z0-9])[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]"
            r"(?![A-Za-z0-9])"
        ),
        _nino_is_valid,
    ),
    _IdRule(
        re.compile(r"(?<![\w-])\d{3}[ -]?\d{3}[ -]?\d{4}(?![\w-])"),
        nhs.is_valid,
        _context(r"nhs(?:\s+(?:number|no\.?))?"),
    ),
    _IdRule(
        re.compile(r"(?<![\w-])\d{2} ?\d{3} ?\d{3} ?\d{3}(?![\w-])"),
        lambda n: idnr.is_valid(n.replace(" ", "")),
        _context(
            r"steuer-?id|steuer-?idnr|idnr|steuer-?identifikationsnummer|"
            r"identifikationsnummer|tax\s+id"
        ),
    ),
    _IdRule(
        re.compile(r"(?<![\w-])[12] ?\d{2} ?\d{2} ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}(?![\w-])"),
        lambda n: nir.is_valid(n.replace(" ", "")),
    ),
    _IdRule(re.compile(r"(?<![\w-])\d{8}-?[A-Z](?![\w-])"), dni.is_valid),
    _IdRule(re.compile(r"(?<![\w-])[XYZ]-?\d{7}-?[A-Z](?![\w-])"), nie.is_valid),
    _IdRule(
        re.compile(r"(?<![\w.-])(?:\d{9}|\d{4}\.\d{2}\.\d{3})(?![\w-]|\.\d)"),
        lambda n: bsn.is_valid(n.replace(".", "")),
        _context(r"bsn|burgerservicenummer|sofinummer|sofi-?nummer"),
    ),
    _IdRule(re.compile(r"(?<![\w-])[2-9]\d{3} \d{4} \d{4}(?![\w-])"), aadhaar.is_valid),
    _IdRule(
        re.compile(r"(?<![\w-])[2-9]\d{11}(?![\w-])"),
        aadhaar.is_valid,
        _context(r"aadhaar|aadhar|uidai|uid"),
    ),
    _IdRule(re.compile(r"(?<![\w-])[A-Z]{3}[ABCFGHJLPT][A-Z]\d{4}[A-Z](?![\w-])"), pan.is_valid),
    _IdRule(re.compile(r"(?<![\w.-])\d{3}\.\d{3}\.\d{3}-\d{2}(?![\w-])"), cpf.is_valid),
    _IdRule(
        re.compile(r"(?<![\w.-])\d{11}(?![\w-])"),
        cpf.is_valid,
        _context(r"cpf"),
    ),
    _IdRule(
        re.compile(r"(?<![\w-])[A-Z]{6}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z](?![\w-])"),
        codicefiscale.is_valid,
    ),
)


def _find_national_ids(text: str) -> Iterator[PiiMatch]:
    for rule in _ID_RULES:
        for match in rule.pattern.finditer(text):
            if rule.context is not None and not rule.context.search(
                text, max(0, match.start() - 40), match.start()
            ):
                continue
            if rule.is_valid(match.group()):
                yield PiiMatch("NATIONAL_ID", match.start(), match.end())


# --- IP addresses ------------------------------------------------------------

_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:|:){2,7}(?:[0-9A-Fa-f]{1,4}|:|(?:\d{1,3}\.){3}\d{1,3})"
    r"(?:%[\w.]+)?(?![\w:])"
)
# A dotted quad after one of these words numbers a version or a section.
_VERSION_WORD = re.compile(
    r"(?i)(?:\b(?:v|ver|version|versions|release|build|firmware|fw|driver|kernel|patch|update|"
    r"upgrade\s+to|sdk|api|section|sec|chapter|clause|paragraph|para|figure|fig|table|item|"
    r"step|rule)\.?|§)\s*[:=#]?\s*$"
)


def _find_ips(text: str) -> Iterator[PiiMatch]:
    if text.count(".") >= 3:
        for match in _IPV4.finditer(text):
            if _VERSION_WORD.search(text, max(0, match.start() - 20), match.start()):
                continue
            if _is_identifying_ip(match.group()):
                yield PiiMatch("IP", match.start(), match.end())
    if text.count(":") >= 2:
        for match in _IPV6.finditer(text):
            address = match.group().split("%", 1)[0]
            # "x[1::2]" is a slice, "fe80::1" identifies no one: demand three
            # groups (an embedded IPv4 address counts as two), as every
            # routable address written by a person has.
            groups = sum(1 for group in address.split(":") if group) + ("." in address)
            if groups >= 3 and _is_identifying_ip(address):
                yield PiiMatch("IP", match.start(), match.end())


def _is_identifying_ip(candidate: str) -> bool:
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return not (address.is_loopback or address.is_unspecified)


# --- Phone numbers -----------------------------------------------------------

# Where a phone number could be: an optional "+" or "(", then digits with the
# separators people write between them. phonenumbers runs only on these.
_PHONE_CANDIDATE = re.compile(r"(?<![\w+])\+?\(?\d[\d \t\u00a0\u2010-\u2015().\-/]{5,24}\d")
_PHONE_WINDOW_PAD = 6
_PHONE_BUDGET = 32
_DIGIT_GROUP = re.compile(r"\d+")
_PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN", "BR", "ES", "NL", "IT")
_PHONE_WORDS = (
    r"phone|tel|telephone|call|ring|mobile|cell|cellphone|whatsapp|signal|sms|text|fax|"
    r"number|contact|reach|dial|hotline|handy|telefon|anrufen|ruf|mobil|portable|"
    r"appelez|appelle|movil|telefono|llama|llamame|celular|ligue|fone|bel|mobiel|nummer|"
    r"numero|cellulare|chiama"
)
_PHONE_CONTEXT = re.compile(rf"(?i)\b(?:{_PHONE_WORDS})\b[^\n]{{0,30}}$")
_NOT_PHONE_CONTEXT = re.compile(
    r"(?i)(?:\b(?:order|invoice|inv|ticket|tracking|ref|reference|account|acct|isbn|issn|serial|"
    r"sku|transaction|txn|confirmation|booking|case|po|receipt|part|model|id|iban|"
    r"card|ssn|nhs|cpf|bsn|aadhaar|timestamp|epoch)\b|#)[^\w\n]{0,3}(?:\w+[^\w\n]{1,3})?$"
)
_DATE_LIKE = re.compile(r"^(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4})$")
# A candidate that holds a full date, or ends in the hour of a time, is a
# timestamp ("2024-05-01 10:30"), however many digits it has.
_HOLDS_DATE = re.compile(r"\b(?:\d{4}[-/.]\d{2}[-/.]\d{2}|\d{2}[-/.]\d{2}[-/.]\d{4})\b")
_TIME_AFTER = re.compile(r":\d\d")
# US ZIP+4 and the SSN shape: no country writes phone numbers this way, but
# Spanish numbering accepts the digits.
_NOT_PHONE_SHAPE = re.compile(r"^(?:\d{5}-\d{4}|\d{3}-\d{2}-\d{4})$")
# Part of a code rather than a number of its own: "INV-2024-000123", "#1234567".
_GLUED_PREFIX = re.compile(r"(?:\w|#|\w[-/])$")


def _find_phones(text: str) -> Iterator[PiiMatch]:
    seen: set[tuple[int, int]] = set()
    checked = 0
    for candidate in _PHONE_CANDIDATE.finditer(text):
        raw = candidate.group().strip()
        groups = _DIGIT_GROUP.findall(raw)
        if (
            sum(map(len, groups)) < 7
            # No numbering plan writes more than two lone digits ("+33 6 …",
            # "+44 (0) 20 …"); "1 2 3 4 5 6 7" is a list, not a phone.
            or sum(1 for group in groups if len(group) == 1) > 2
            or _HOLDS_DATE.search(raw)
            or _TIME_AFTER.match(text, candidate.start() + len(raw))
            or not _is_phone_in_context(text, candidate.start(), raw)
        ):
            continue
        checked += 1
        if checked > _PHONE_BUDGET:
            # A log line full of numbers must not buy seconds of CPU; past the
            # budget a plausible candidate is redacted unverified, since
            # redacting too much is the safe way to fail.
            yield PiiMatch("PHONE", candidate.start(), candidate.start() + len(raw))
            continue
        # Match on a window, not the whole text: phonenumbers is slow, and
        # the few characters around the number are all the context it uses.
        offset = max(0, candidate.start() - _PHONE_WINDOW_PAD)
        window = text[offset : candidate.end() + _PHONE_WINDOW_PAD]
        if raw.startswith("+"):
            # Any region parses "+"-prefixed numbers; accept a possible
            # length because test and drama ranges fail full validation.
            passes: list[tuple[str | None, int]] = [(None, Leniency.POSSIBLE)]
        else:
            passes = [(region, Leniency.STRICT_GROUPING) for region in _PHONE_REGIONS]
        whole = (candidate.start(), candidate.start() + len(candidate.group().rstrip()))
        for region, leniency in passes:
            covered = False
            for found in PhoneNumberMatcher(window, region, leniency=leniency):
                span = (offset + found.start, offset + found.end)
                covered = covered or (span[0] <= whole[0] and span[1] >= whole[1])
                if span in seen:
                    continue
                seen.add(span)
                if _is_phone_in_context(text, span[0], found.raw_string):
                    yield PiiMatch("PHONE", *span)
            if covered:
                # The whole candidate is one number; other regions could only
                # find a shorter part of it, which would lose anyway.
                break


def _is_phone_in_context(text: str, start: int, raw: str) -> bool:
    before = text[max(0, start - 40) : start]
    if _GLUED_PREFIX.search(before):
        return False
    if raw.startswith("+"):
        return True
    if _NOT_PHONE_SHAPE.match(raw) or _DATE_LIKE.match(raw) or _NOT_PHONE_CONTEXT.search(before):
        return False
    if raw.isdigit() and not raw.startswith("00"):
        # A bare digit run is as likely an id or a count as a phone number.
        return bool(_PHONE_CONTEXT.search(before))
    return True


# --- Walking structures ------------------------------------------------------

_CREDENTIAL_KEY_SUFFIXES = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "authorization",
    "cookie",
    "cookies",
    "sessionid",
    "csrftoken",
    "privatekey",
    "credential",
    "credentials",
    "accesskey",
    "secretkey",
)
_KEY_SEPARATORS = re.compile(r"[\s_.\-]")


def _is_credential_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    return _KEY_SEPARATORS.sub("", key).lower().endswith(_CREDENTIAL_KEY_SUFFIXES)


def _redact_value(value: object, *, depth: int, path: set[int]) -> object:
    if isinstance(value, str):
        return redact(value)
    if not isinstance(value, dict | list | tuple | set | frozenset):
        return value
    if depth >= _MAX_DEPTH or id(value) in path:
        return "[TRUNCATED]"
    path.add(id(value))
    try:
        if isinstance(value, dict):
            return {
                key: "[SECRET]"
                if isinstance(item, str) and item and _is_credential_key(key)
                else _redact_value(item, depth=depth + 1, path=path)
                for key, item in value.items()
            }
        items = [_redact_value(item, depth=depth + 1, path=path) for item in value]
        if isinstance(value, list):
            return items
        if isinstance(value, tuple):
            if hasattr(value, "_fields"):
                named_tuple: Callable[..., object] = type(value)
                return named_tuple(*items)
            return tuple(items)
        if isinstance(value, frozenset):
            return frozenset(items)
        return set(items)
    finally:
        path.discard(id(value))
