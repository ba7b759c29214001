"""Moderation of what users send and what models answer, behind one interface.

A `Moderator` turns text into a `Verdict` (flagged) or None. Two exist:

- `RulesModerator`, built in, no network: categories of weighted patterns
  (the hostile *shape*, e.g. "how to build a pipe bomb", not the topic) and
  word lists (weak hints that only flag together), matched on text folded the
  same way as the injection heuristics (NFKC, invisible characters removed,
  look-alike letters of other scripts turned into Latin ones, Markdown
  emphasis and code marks removed, casefolded, accents and leet undone:
  chat/safety/injection.py).
- `OpenAIModerator`, the `/moderations` endpoint of `OPENAI_BASE_URL`, when
  `CHAT_MODERATION_OPENAI` is on. It runs after the rules pass. With
  `CHAT_REDACT_VENDOR_TEXT` it sends typed placeholders (`[EMAIL]` …) in
  place of personal data, as the model vendor gets. When it
  cannot be reached the rules' answer stands (fail open to the rules, with a
  warning), so a vendor outage does not stop every reply.

The configured moderator (`moderator_from_settings`) judges the user's
message once (chat/pipeline.py: in the admission trip when it is the rules
alone). `OutputGate` sits between the model and the socket: it holds the
reply back in windows (a sentence, or `CHAT_MODERATION_WINDOW_TOKENS` tokens
/ `CHAT_MODERATION_WINDOW_CHARS` characters, whichever first), judges each
window together with the last words of what was already released (as many
as the longest rule match can span, so a phrase split across windows is
still seen whole) and with what the reply's earlier windows matched (hint
words add up across the reply), and releases only judged text: it releases
nothing the whole-text check would flag on the text released so far. On a
flag it raises `Moderated` and the held window is dropped, so flagged text
never reaches the browser.
Per chunk it only scans the new characters for a sentence end; patterns run
once per window (docs/decisions/0007-moderation-window.md).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import httpx
from django.conf import settings

from chat.safety.injection import _fold_flat, _squash, fold_variants
from chat.safety.pii import redact
from chat.safety.regexes import max_word_breaks, shared_prefixes
from chat.snapshots import from_settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Verdict:
    stage: str  # "input" | "output"
    category: str
    score: float

    def as_json(self) -> dict[str, object]:
        return {"stage": self.stage, "category": self.category, "score": round(self.score, 4)}


class Moderated(Exception):
    """Raised by the output gate when a window of the reply is flagged."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(f"{verdict.stage}:{verdict.category}")
        self.verdict = verdict


class Moderator(Protocol):
    async def check(self, text: str, *, stage: str) -> Verdict | None:
        """Return a verdict when `text` is flagged, else None."""
        ...


# --- the rules ----------------------------------------------------------------

_HOW = (
    r"(?:how\s+(?:do|can|could|would|should)\s+(?:i|we|you|one)|how\s+to|steps?\s+to|"
    r"instructions?\s+(?:for|to|on)|guide\s+(?:to|for)|recipe\s+for|tutorial\s+(?:for|on)|"
    r"teach\s+me\s+(?:how\s+)?to|show\s+me\s+how\s+to|help\s+me|best\s+way\s+to|"
    r"easiest\s+way\s+to|ways?\s+to)"
)
_WEAPON = (
    r"(?:pipe\s*bombs?|(?<!bath\s)(?<!photo\s)bombs?|car\s+bombs?|nail\s+bombs?|dirty\s+bombs?|"
    r"ieds?|explosive\s+devices?|explosives|detonators?|molotov\s+cocktails?|molotovs?|"
    r"nerve\s+agents?|sarin|ricin|vx\s+gas|mustard\s+gas|napalm|grenades?|ghost\s+guns?|"
    r"untraceable\s+guns?|silencers?\s+for\s+a\s+(?:gun|rifle|pistol))"
)
_BUILD = r"(?:make|build|assemble|construct|create|manufacture|synthesi[sz]e|cook|produce)"
_PERSON = (
    r"(?:(?:my|a|the|his|her|their|our|your)\s+)?(?:wife|husband|partner|neighbou?r|boss|"
    r"teacher|child|kid|baby|family|mother|father|mom|mum|dad|brother|sister|girlfriend|"
    r"boyfriend|ex|coworker|co-worker|classmate|roommate|someone|somebody|people|person|"
    r"him|her|them|a\s+human|humans|a\s+man|a\s+woman|cops?|police\s+officers?)"
)
_GROUP = (
    r"(?:jews|jewish\s+people|muslims|christians|blacks|black\s+people|whites|white\s+people|"
    r"asians|arabs|mexicans|immigrants|migrants|refugees|gays|gay\s+people|lesbians|"
    r"trans\s+people|transgender\s+people|hindus|sikhs|roma|gypsies|africans|"
    r"chinese\s+people|indians|latinos|disabled\s+people|women)"
)
_MINOR = (
    r"(?:child|children|childs|kid|kids|minor|minors|underage|under-age|preteens?|pre-teens?|"
    r"toddlers?|infants?|schoolgirls?|schoolboys?|little\s+(?:girls?|boys?)|"
    r"(?:[1-9]|1[0-7])\s*-?\s*(?:year|yr)s?\s*-?\s*olds?|lolis?|shotas?)"
)
_SEXUAL = (
    r"(?:sexual(?:ly)?\s+(?:explicit|acts?|content|stor(?:y|ies)|role-?play|images?|photos?|"
    r"pictures?|videos?|fantas(?:y|ies))|nudes?|naked|porn\w*|erotic\w*|explicit|intercourse|"
    r"molest\w*|rape|raping|fondl\w*|aroused|orgasm\w*|masturbat\w*|sexting|sext|nsfw|lewd|"
    r"(?:have|having|had)\s+sex|sex\s+with)"
)
_MALWARE = (
    r"(?:keyloggers?|ransomware|trojans?|rootkits?|botnets?|info-?stealers?|"
    r"(?:credential|password|cookie|token)\s+stealers?|remote\s+access\s+trojans?|"
    r"cryptojackers?|malware|(?:computer\s+)?virus(?!\s*(?:scanner|detection|removal|"
    r"protection|signatures?|definitions?))|backdoors?|spyware|worms?\s+that)"
)
_SECRETS = (
    r"(?:passwords?|credentials|logins?|login\s+details|cookies|session\s+(?:tokens?|cookies)|"
    r"credit\s+card\s+(?:numbers?|details)|card\s+numbers|2fa\s+codes?|otp\s+codes?|"
    r"seed\s+phrases?|private\s+keys|bank\s+(?:logins?|details))"
)


@dataclass(frozen=True, slots=True)
class _Category:
    name: str
    patterns: tuple[tuple[re.Pattern[str], float], ...]
    words: re.Pattern[str] | None
    word_weight: float = 0.2


def _category(
    name: str, patterns: list[tuple[str, float]], words: list[str] | None = None
) -> _Category:
    word_re = (
        re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b") if words else None
    )
    return _Category(name, tuple((re.compile(p), w) for p, w in patterns), word_re)


CATEGORIES: tuple[_Category, ...] = (
    _category(
        "violence",
        [
            (rf"\b{_HOW}\s+(?:\w+\s+){{0,3}}?{_BUILD}\s+(?:\w+\s+){{0,3}}?{_WEAPON}\b", 0.9),
            (
                rf"\b(?:to\s+)?{_BUILD}\w*\s+(?:a\s+|an\s+|the\s+|your\s+)?(?:own\s+)?"
                r"(?:pipe\s*bomb|car\s+bomb|nail\s+bomb|dirty\s+bomb|ied|explosive\s+device|"
                r"molotov\s+cocktail|nerve\s+agent)s?\b",
                0.75,
            ),
            (
                r"\b(?:pack|fill|stuff)\w*\s+(?:the\s+|a\s+)?(?:pipe|casing|container|bottle)\s+"
                r"with\s+(?:\w+\s+){0,2}?(?:explosive|black\s+powder|gunpowder|shrapnel|nails)",
                0.85,
            ),
            (
                rf"\b{_HOW}\s+(?:\w+\s+){{0,2}}?(?:kill|murder|poison|strangle|stab|shoot|"
                rf"behead|torture|kidnap)\s+{_PERSON}\b",
                0.85,
            ),
            (
                r"\b(?:shoot\s+up|bomb|blow\s+up|attack|massacre)\s+(?:a|the|my|our|this)\s+"
                r"(?:school|church|mosque|synagogue|temple|mall|concert|crowd|parade|hospital)\b",
                0.85,
            ),
            (
                r"\b(?:kill|murder|poison)\w*\s+(?:\w+\s+){0,4}?without\s+(?:getting\s+)?"
                r"(?:caught|detected|leaving\s+(?:a\s+|any\s+)?(?:trace|evidence))",
                0.85,
            ),
        ],
        [
            "detonator",
            "blasting cap",
            "shrapnel",
            "tatp",
            "anfo",
            "black powder",
            "nerve agent",
            "kill list",
            "hitman",
            "untraceable",
        ],
    ),
    _category(
        "self-harm",
        [
            (
                rf"\b{_HOW}\s+(?:\w+\s+){{0,2}}?(?:kill\s+myself|end\s+my\s+(?:own\s+)?life|"
                r"commit\s+suicide|suicide|hang\s+myself|overdose|cut\s+myself|"
                r"slit\s+my\s+wrists|starve\s+myself)\b",
                0.9,
            ),
            (
                r"\b(?:you\s+should|go|just\s+go\s+and|why\s+don'?t\s+you)\s+(?:just\s+)?"
                r"(?:kill\s+yourself|end\s+your\s+(?:own\s+)?life|commit\s+suicide|"
                r"hang\s+yourself|slit\s+your\s+wrists)\b|\bkys\b",
                0.85,
            ),
            (
                r"\b(?:painless|quick|quickest|easy|easiest|best|surest)\s+(?:way|method)s?\s+"
                r"(?:to|of)\s+(?:die|dying|suicide|killing\s+(?:myself|yourself))\b",
                0.9,
            ),
        ],
        ["suicide note", "noose", "lethal dose", "fatal dose", "slit", "wrists", "pills to die"],
    ),
    _category(
        "hate",
        [
            (
                rf"\b(?:all\s+|the\s+)?{_GROUP}\s+(?:should|must|need\s+to|deserve\s+to|"
                r"ought\s+to|have\s+to)\s+(?:all\s+)?(?:die|be\s+(?:killed|exterminated|"
                r"eradicated|wiped\s+out|gassed|lynched|burned|shot|hanged))\b",
                0.9,
            ),
            (
                r"\b(?:kill|exterminate|eradicate|gas|wipe\s+out|lynch|burn)\s+"
                rf"(?:all\s+(?:the\s+)?|every\s+(?:last\s+)?)?{_GROUP}\b",
                0.85,
            ),
            (
                rf"\b{_GROUP}\s+(?:are|r)\s+(?:(?:just|all|nothing\s+but|like|no\s+better\s+than)"
                r"\s+){0,4}(?:vermin|subhuman|sub-human|animals|cockroaches|rats|parasites|"
                r"a\s+disease|a\s+plague|a\s+cancer|filth|savages|insects)\b",
                0.8,
            ),
        ],
        [
            "subhuman",
            "untermensch",
            "vermin",
            "ethnic cleansing",
            "final solution",
            "race war",
            "white genocide",
            "great replacement",
            "mongrel",
        ],
    ),
    _category(
        "sexual/minors",
        [
            (rf"\b{_MINOR}\b(?:\W+\w+){{0,6}}?\W+{_SEXUAL}\b", 0.9),
            (rf"\b{_SEXUAL}\b(?:\W+\w+){{0,6}}?\W+{_MINOR}\b", 0.9),
        ],
        ["csam", "jailbait", "lolicon", "shotacon", "pedo", "pedophile", "paedophile"],
    ),
    _category(
        "illicit",
        [
            (
                r"\b(?:write|create|code|build|make|develop|generate|program|give\s+me|"
                r"send\s+me|design)\s+(?:me\s+)?(?:a\s+|an\s+|some\s+|the\s+)?"
                rf"(?:\w+\s+){{0,2}}?{_MALWARE}",
                0.85,
            ),
            (
                r"\b(?:steal|stealing|harvest|harvesting|exfiltrate|exfiltrating|phish|phishing)"
                rf"\s+(?:\w+\s+){{0,3}}?{_SECRETS}\b",
                0.75,
            ),
            (
                r"\bphishing\s+(?:page|site|website|kit|e-?mail|campaign|link|template)s?\b",
                0.5,
            ),
            (
                r"\b(?:evade|evading|bypass|bypassing|disable|disabling|avoid)\s+(?:the\s+)?"
                r"(?:antivirus|anti-virus|edr|windows\s+defender|av\s+detection|"
                r"malware\s+detection)\b",
                0.6,
            ),
            (r"\bdump\w*\s+(?:the\s+)?lsass\b|\bcredential\s+stuffing\s+(?:attack|list)s?\b", 0.5),
        ],
        [
            "keylogger",
            "ransomware",
            "infostealer",
            "mimikatz",
            "lsass",
            "credential stuffing",
            "carding",
            "fullz",
            "cvv dumps",
            "botnet",
            "c2 server",
            "reverse shell",
            "exfiltrate",
            "obfuscate",
        ],
    ),
)

# Every pattern and word list in one alternation: clean text (nearly all of
# it) costs one scan instead of one per pattern. It runs on every output
# window, so on the streaming hot path, and is only asked whether anything
# matches: its alternatives share their leading characters
# (chat/safety/regexes.py), so a word start tries only those that begin
# with its letters.
_RULES_ALTERNATION = re.compile(
    "|".join(
        [f"(?:{p.pattern})" for c in CATEGORIES for p, _w in c.patterns]
        + [f"(?:{c.words.pattern})" for c in CATEGORIES if c.words is not None]
    )
)
_ANY_RULE = shared_prefixes(_RULES_ALTERNATION)

# How many words of the released text an output window is judged with: the
# most words any rule's match can span (its most runs of non-word characters,
# plus one), and one more for a lookbehind or \b just before it. A match that
# ends in the window then begins inside what the window is judged with, so
# the gate sees every match the whole reply holds (OutputGate). Bounded
# because every repeat in the rules is (tests/safety/test_moderation.py).
CONTEXT_WORDS = (max_word_breaks(_RULES_ALTERNATION) or 30) + 2


def rules_scores(text: str) -> dict[str, float]:
    """Return each category's score in [0, 1] for `text` (noisy-OR of what matched)."""
    folded = _fold_flat(text)
    return _scores(folded, _squash(folded))


def _scores(folded: str, squashed: str) -> dict[str, float]:
    found = _found(folded, squashed)
    return _scores_of(found) if found else {}


# What matched: (category index, pattern index) for a pattern, (category
# index, the word) for a word-list hint.
_Found = set[tuple[int, int | str]]


def _found(folded: str, squashed: str) -> _Found:
    variants = (folded,) if squashed == folded else (folded, squashed)
    found: _Found = set()
    if not any(_ANY_RULE.search(v) for v in variants):
        return found
    for index, category in enumerate(CATEGORIES):
        for number, (pattern, _weight) in enumerate(category.patterns):
            if any(pattern.search(v) for v in variants):
                found.add((index, number))
        if category.words is not None:
            found.update((index, m.group()) for v in variants for m in category.words.finditer(v))
    return found


def _scores_of(found: _Found) -> dict[str, float]:
    """Return each category's noisy-OR score over what was found."""
    scores: dict[str, float] = {}
    for index, category in enumerate(CATEGORIES):
        remaining = 1.0
        for number, (_pattern, weight) in enumerate(category.patterns):
            if (index, number) in found:
                remaining *= 1.0 - weight
        words = sum(1 for i, key in found if i == index and isinstance(key, str))
        remaining *= (1.0 - category.word_weight) ** words
        score = round(1.0 - remaining, 4)
        if score > 0:
            scores[category.name] = score
    return scores


class RulesModerator:
    """The built-in moderator: weighted patterns and word lists per category."""

    def __init__(self, *, threshold: float) -> None:
        self.threshold = threshold

    def check_now(self, text: str, *, stage: str) -> Verdict | None:
        if stage == "input":
            # The injection score has just folded this message the same way.
            _lines, folded, squashed = fold_variants(text)
            scores = _scores(folded, squashed)
        else:
            scores = rules_scores(text)
        if not scores:
            return None
        category, score = max(scores.items(), key=lambda item: item[1])
        return Verdict(stage, category, score) if score >= self.threshold else None

    async def check(self, text: str, *, stage: str) -> Verdict | None:
        return self.check_now(text, stage=stage)

    def for_reply(self) -> ReplyRules:
        """Return a moderator for one reply's windows that adds up what they matched."""
        return ReplyRules(threshold=self.threshold)


class ReplyRules:
    """The rules for one reply's windows: what every window matched counts together.

    The whole reply scores each pattern and each hint word once, however far
    apart they are ("detonator" early, "blasting cap", "shrapnel" and "tatp"
    later: 0.2 each, 0.59 together). A window, even with its context, sees
    only some of them; this keeps what all the windows so far matched, so a
    window's verdict is the verdict on the reply up to its end, for the cost
    of a set union.
    """

    def __init__(self, *, threshold: float) -> None:
        self.threshold = threshold
        self.found: _Found = set()

    async def check(self, text: str, *, stage: str) -> Verdict | None:
        folded = _fold_flat(text)
        self.found |= _found(folded, _squash(folded))
        if not self.found:
            return None
        scores = _scores_of(self.found)
        category, score = max(scores.items(), key=lambda item: item[1])
        return Verdict(stage, category, score) if score >= self.threshold else None


def for_reply(moderator: Moderator) -> Moderator:
    """Return `moderator` as one reply's windows use it (see ReplyRules)."""
    make = getattr(moderator, "for_reply", None)
    return make() if make is not None else moderator


# What redaction cannot recognise in an output window: the window may end
# (or its context begin) inside an e-mail address or a number that the next
# window completes, and a fragment ("4111 1111", "anna.k@exa") is personal
# data too. Any word with an @ in it, and any number of three digits or more
# (groups joined by spaces, dashes, dots, slashes or brackets), is replaced.
# Ages ("a 12 year old") keep their digits: the vendor needs them to judge.
_EMAIL_FRAGMENT = re.compile(r"[^\s\[\]]*@[^\s\[\]]*")
_NUMBER_FRAGMENT = re.compile(r"\+?\d(?:[\d \-./()]*\d)?")


def redact_for_moderation(text: str) -> str:
    """Return `text` as a moderation vendor may see it: no personal data, whole or in part."""
    text = redact(text)
    if "@" in text:
        text = _EMAIL_FRAGMENT.sub("[EMAIL]", text)
    return _NUMBER_FRAGMENT.sub(_number_placeholder, text)


def _number_placeholder(match: re.Match[str]) -> str:
    number = match.group()
    return "[NUMBER]" if sum(c.isdigit() for c in number) >= 3 else number


class OpenAIModerator:
    """The OpenAI moderation endpoint (`POST {base_url}/moderations`)."""

    def __init__(
        self, *, base_url: str, api_key: str, model: str, timeout: float, redact: bool = False
    ) -> None:
        self.url = base_url.rstrip("/") + "/moderations"
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self.redact = redact

    async def check(self, text: str, *, stage: str) -> Verdict | None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if self.redact:
            text = redact_for_moderation(text)
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.post(
                    self.url, json={"model": self.model, "input": text}, headers=headers
                )
                response.raise_for_status()
                result = response.json()["results"][0]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            # The rules have already passed this text; an unreachable vendor
            # must not stop every reply (docs/decisions/0007-moderation-window.md).
            logger.warning(
                "moderation endpoint failed (%s); rules verdict stands", type(exc).__name__
            )
            return None
        if not isinstance(result, dict) or not result.get("flagged"):
            return None
        flagged = [name for name, hit in (result.get("categories") or {}).items() if hit]
        scores = result.get("category_scores") or {}
        if not flagged:
            return Verdict(stage, "flagged", 1.0)
        category = max(flagged, key=lambda name: float(scores.get(name) or 0.0))
        return Verdict(stage, category, float(scores.get(category) or 1.0))


class ModeratorChain:
    """Ask each moderator in turn; the first verdict wins."""

    def __init__(self, moderators: list[Moderator]) -> None:
        self.moderators = moderators

    async def check(self, text: str, *, stage: str) -> Verdict | None:
        for moderator in self.moderators:
            verdict = await moderator.check(text, stage=stage)
            if verdict is not None:
                return verdict
        return None

    def for_reply(self) -> ModeratorChain:
        return ModeratorChain([for_reply(moderator) for moderator in self.moderators])


@from_settings
def moderator_from_settings() -> Moderator:
    """Return the configured moderator: the rules, then OpenAI when enabled.

    Built once and again after a settings change: every message asks for it
    twice (its input, its reply's windows), and building it reads four to
    eight settings (~4 us on the event loop, a burst asks 2,000 times).
    """
    rules = RulesModerator(threshold=settings.CHAT_MODERATION_THRESHOLD)
    if not settings.CHAT_MODERATION_OPENAI:
        return rules
    openai = OpenAIModerator(
        base_url=getattr(settings, "OPENAI_BASE_URL", None) or "https://api.openai.com/v1",
        api_key=getattr(settings, "OPENAI_API_KEY", "") or "",
        model=settings.CHAT_MODERATION_OPENAI_MODEL,
        timeout=settings.CHAT_MODERATION_OPENAI_TIMEOUT_S,
        redact=settings.CHAT_REDACT_VENDOR_TEXT,
    )
    return ModeratorChain([rules, openai])


# A sentence ends at . ! ? … (and CJK stops), after any closing quotes or
# brackets, when whitespace follows; a line break always ends a window.
_SENTENCE_END = re.compile(
    r"[.!?\u2026\u3002\uff01\uff1f]['\"\u2019\u201d)\]]*(?=\s)|[\u3002\uff01\uff1f]|\n"
)
# How far back a new chunk's scan starts, for an end split across chunks.
_SCAN_OVERLAP = 4


# The last CONTEXT_WORDS words of a text, read backwards, and the rest of the
# whitespace-separated word the last of them is in. Possessive: a word is
# one run, never split in two to make up the count.
_LAST_WORDS = re.compile(rf"(?:\W*+\w++){{{CONTEXT_WORDS}}}\S*+")


def _context_tail(text: str, *, limit: int) -> str:
    """Return the end of `text` that holds its last CONTEXT_WORDS words, at most `limit` chars.

    It begins where a whitespace-separated word begins, so the moderation
    vendor never gets the tail half of an address or a number. Only words
    longer than `limit` / CONTEXT_WORDS characters on average make the limit
    bind; it keeps a window's check bounded whatever the model writes.
    """
    words = _LAST_WORDS.match(text[::-1])  # one pass, from the end
    keep = min(len(text) if words is None else words.end(), limit)
    return text[len(text) - keep :]


# How much a fast stream's windows may grow (see OutputGate).
MAX_WINDOW_SCALE = 8


class OutputGate:
    """Hold the reply back until each window of it has been moderated.

    A window ends at a sentence end or at `window_tokens` / `window_chars`,
    whichever comes first. With `first_window_tokens`, the reply's first
    window is that short, so the first words show without waiting for a
    whole window (later windows are judged with it as context).

    With `clock` (a monotonic time source):
    - `max_hold_s` also ends a window once that long has passed since the
      last release (checked as each token arrives): frames are at most about
      that far apart, no text waits longer, and a token that comes slower
      than that is released as it arrives;
    - a window that filled in less than `fast_s` doubles the next one, up to
      MAX_WINDOW_SCALE times the configured size; a slower one resets it.
      Text that arrives faster than the socket sends it (a cached reply, a
      very fast model) is then checked in larger pieces, which costs no
      latency the user could see.
    """

    def __init__(
        self,
        moderator: Moderator | None = None,
        *,
        window_tokens: int | None = None,
        window_chars: int | None = None,
        context_chars: int | None = None,
        first_window_tokens: int | None = None,
        clock: Callable[[], float] | None = None,
        max_hold_s: float | None = None,
        fast_s: float = 0.025,
    ) -> None:
        self.moderator = moderator or moderator_from_settings()
        self._judge = for_reply(self.moderator)  # adds up what the windows matched
        self.window_tokens = max(1, window_tokens or settings.CHAT_MODERATION_WINDOW_TOKENS)
        self.window_chars = max(1, window_chars or settings.CHAT_MODERATION_WINDOW_CHARS)
        self.context_chars = (
            settings.CHAT_MODERATION_CONTEXT_CHARS if context_chars is None else context_chars
        )
        self._first_window_tokens = first_window_tokens
        self._released_any = False
        self._clock = clock
        self._max_hold_s = max_hold_s if clock is not None else None
        self._fast_s = fast_s
        self._scale = 1
        self._window_started = 0.0
        self._released_at: float | None = None  # the last release, by the clock
        self._held = ""
        self._held_tokens = 0
        self._scanned = 0  # no sentence end in _held before this index
        self._context = ""  # the tail of what was released

    async def feed(self, chunk: str) -> list[str]:
        """Return the text that is now safe to show; raise Moderated on a flag."""
        if not chunk:
            return []
        if not self._held and self._clock is not None:
            self._window_started = self._clock()
        self._held += chunk
        self._held_tokens += 1
        released: list[str] = []
        while (cut := self._cut_point()) is not None:
            released.append(await self._release(cut))
        return released

    async def finish(self) -> list[str]:
        """Moderate and return whatever is still held back."""
        if not self._held:
            return []
        return [await self._release(len(self._held))]

    def _cut_point(self) -> int | None:
        held = self._held
        if not held:
            return None
        if not self._released_any and self._first_window_tokens is not None:
            return len(held) if self._held_tokens >= self._first_window_tokens else None
        chars = self.window_chars * self._scale
        if self._scale == 1:
            match = _SENTENCE_END.search(held, max(0, self._scanned - _SCAN_OVERLAP))
            if match is not None and match.end() <= chars:
                return match.end()
            self._scanned = len(held)
        if (
            len(held) < chars
            and self._held_tokens < self.window_tokens * self._scale
            and not self._held_too_long()
        ):
            return None
        # No sentence end within bounds: cut at the last space, never mid-word
        # unless one "word" fills the whole window.
        limit = min(len(held), chars)
        space = held.rfind(" ", 1, limit)
        return space if space > 0 else limit

    def _held_too_long(self) -> bool:
        if self._max_hold_s is None or self._clock is None:
            return False
        since = self._window_started if self._released_at is None else self._released_at
        return self._clock() - since >= self._max_hold_s

    async def _release(self, cut: int) -> str:
        if self._clock is not None:
            now = self._clock()
            if self._released_any:  # the short first window says nothing of the pace
                fast = now - self._window_started < self._fast_s
                self._scale = min(self._scale * 2, MAX_WINDOW_SCALE) if fast else 1
            self._window_started = self._released_at = now
        self._released_any = True
        window, rest = self._held[:cut], self._held[cut:]
        verdict = await self._judge.check(self._context + window, stage="output")
        if verdict is not None:
            raise Moderated(verdict)
        self._held = rest
        self._held_tokens = 1 if rest else 0
        self._scanned = 0
        if self.context_chars:
            self._context = _context_tail(self._context + window, limit=self.context_chars)
        return window
