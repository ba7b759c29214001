"""Score text for prompt-injection and system-prompt-extraction attempts.

`injection_score(text)` returns an `InjectionVerdict`: a score in [0, 1] and
the names of the signals that fired. It is a cheap heuristic that runs on
every message before the model is called; it never blocks on its own. The
pipeline decides what a score means (log, flag for review, refuse), using
`SUSPICIOUS_SCORE` and `LIKELY_SCORE` as the shared vocabulary.

How text is matched
-------------------
Attackers dodge keyword lists with case, spacing, accents, look-alike letters,
Markdown and invisible characters, so every pattern runs on a folded copy of
the text: NFKC (full-width and mathematical letters become ASCII), format
characters (zero-width, bidi, soft hyphen) removed, Unicode TAG characters
decoded back to the ASCII they hide, look-alike letters of other scripts
turned into the Latin letters they imitate ("pipe bomb" with a Cyrillic o is
"pipe bomb", see below), casefolded, Latin accents stripped ("précédentes" ->
"precedentes") and whitespace collapsed. Natural-language patterns run on a
copy without Markdown emphasis and code marks (* _ ` ~ ^, == and inline
HTML emphasis tags, also inside words: "pi**pe bo**mb" -> "pipe bomb"), and
also on a "squashed" copy where leet digits next to letters become letters
("1gn0r3" -> "ignore") and spaced-out letters are joined ("i g n o r e" ->
"ignore"). Fake chat-template tags are matched on a copy that keeps line
breaks and underscores ("<|im_start|>").

Look-alike letters come from a short table of the common confusables in
Unicode's confusables list (Cyrillic, Greek, Armenian, Cherokee, Lisu and a
few Latin extras that NFKC leaves alone), and are folded word by word: a
word is folded when each of its letters is Latin or has a Latin twin ("bomb"
with a Cyrillic o, or "pipe" all in Cyrillic). Ordinary Russian or Greek
keeps nearly every word as written, since almost every word of it has a
letter with no Latin twin (Cyrillic be, de, i, el, ya; Greek delta, lambda,
pi, omega): prose in those scripts is not turned into English, and the
patterns written in them still match
(tests/safety/data/benign_multilingual.txt).

How the score is built
----------------------
Each signal has a weight, the probability-like strength of that signal on its
own: 0.8-0.9 for unambiguous phrases ("ignore all previous instructions",
"reveal your system prompt", "you are now DAN"), 0.5-0.75 for phrases that
are usually but not always hostile (fake role tags, "disregard the above",
"ChatGPT with Developer Mode"), and 0.2-0.45 for weak hints that ordinary
chat also produces ("from now on you …", a long base64 blob, "stay in
character"). A base64 blob that decodes to prose is scored again, and its
own score becomes the weight of `encoded_injection`. A signal counts once
however often it matches. The weights are combined as a noisy-OR,

    score = 1 - prod(1 - weight_i)        (rounded to 4 places)

so one strong signal is enough to pass `SUSPICIOUS_SCORE` (0.5), two weak
ones approach it, and several together approach 1. `LIKELY_SCORE` (0.8) is
reached by one unambiguous phrase or by two medium signals together.

False positives are kept low by requiring the hostile shape, not the topic:
"ignore the typo", "ignore my previous message", "what's a system prompt in
LLMs?" and "how do I enable developer mode on Android?" do not match, because
the patterns need a second-person target ("your instructions", "your system
prompt"), an instruction noun with a "previous/above/system" qualifier, or an
AI-specific persona.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import unicodedata
from dataclasses import dataclass

from chat.safety.regexes import guarded, shared_prefixes

__all__ = ["LIKELY_SCORE", "SUSPICIOUS_SCORE", "InjectionVerdict", "injection_score"]

SUSPICIOUS_SCORE = 0.5
LIKELY_SCORE = 0.8


@dataclass(frozen=True, slots=True)
class InjectionVerdict:
    score: float
    signals: tuple[str, ...]

    @property
    def is_suspicious(self) -> bool:
        """Return whether the score reaches `SUSPICIOUS_SCORE`."""
        return self.score >= SUSPICIOUS_SCORE


@dataclass(frozen=True, slots=True)
class _Signal:
    name: str
    weight: float
    pattern: re.Pattern[str]  # guarded
    plain: re.Pattern[str]  # as written


def _signal(name: str, weight: float, pattern: str, flags: int = 0) -> _Signal:
    # Every message is scanned by every signal: the guard skips positions no
    # match can begin at (chat/safety/regexes.py).
    plain = re.compile(pattern, flags)
    return _Signal(name, weight, guarded(plain), plain)


# --- English building blocks (matched on casefolded, accent-free text) -------

_IGNORE = (
    r"(?:ignore|ignoring|disregard|disregarding|forget|forgetting|skip|overlook|override|"
    r"bypass|neglect|abandon|discard|set\s+aside|throw\s+out|stop\s+following|"
    r"do\s+not\s+follow|don'?t\s+follow|no\s+longer\s+follow)"
)
# Words that may sit between the verb and the qualifier. "my" is deliberately
# absent: "ignore my previous message" is a user correcting themselves.
_DETERMINERS = r"(?:(?:all|any|every|each|of|the|your|ur|those|these|such|and|previously)\s+)"
_QUALIFIER = (
    r"(?:previous|prior|preceding|above|earlier|initial|original|former|foregoing|"
    r"system|developer|safety|hidden|pre-?programmed|existing)"
)
_INSTRUCTION_NOUN = (
    r"(?:instructions?|prompts?|directions|directives?|rules|guidelines|guidance|commands|"
    r"orders|context|programming|restrictions|constraints|guardrails|policies|"
    r"training|conditioning)"
)
_PROMPT_TARGET = (
    r"(?:system\s*-?\s*prompt|system\s+message|system\s+instructions|"
    r"(?:initial|original|hidden|secret|internal|first|starting|core|base)\s+"
    r"(?:instructions|prompt|directives|rules)|pre-?prompt|meta\s*-?prompt|"
    r"developer\s+(?:message|instructions|prompt)|instructions|prompt|rules|guidelines|"
    r"directives|configuration|programming)"
)
_SHOW = (
    r"(?:reveal|print|show|display|output|repeat|recite|echo|dump|leak|expose|tell\s+me|"
    r"give\s+me|share|write\s+(?:out|down)?|type\s+out|list|spell\s+out|copy|paste|"
    r"provide|send|return|disclose|divulge|read\s+(?:back|out)|quote|summari[sz]e|"
    r"translate|what\s+(?:is|are|was|were)|what'?s|whats)"
)
_AI_PERSONA = (
    r"(?:dan|stan|jailbroken|unfiltered|uncensored|unrestricted|unchained|unbound|amoral|"
    r"unethical|unaligned|evil\s*(?:bot|ai|gpt)|anti-?gpt|mongo\s+tom)"
)

# Natural-language signals, matched on the folded and the squashed text.
_LANGUAGE_SIGNALS: tuple[_Signal, ...] = (
    _signal(
        "ignore_previous_instructions",
        0.9,
        rf"\b{_IGNORE}\s+{_DETERMINERS}{{0,4}}{_QUALIFIER}\s+(?:(?:and|or|,)\s*{_QUALIFIER}\s+)?"
        rf"(?:\w+\s+)?{_INSTRUCTION_NOUN}\b",
    ),
    _signal(
        "ignore_your_instructions",
        0.8,
        rf"\b{_IGNORE}\s+(?:(?:all|any|every|of)\s+)*(?:your|ur)\s+(?:\w+\s+)?"
        rf"(?:{_INSTRUCTION_NOUN}|instructions|rules)\b",
    ),
    _signal(
        "ignore_all_rules",
        0.7,
        rf"\b{_IGNORE}\s+(?:all|any|every)\s+(?:of\s+)?(?:the\s+)?(?:\w+\s+)?{_INSTRUCTION_NOUN}\b",
    ),
    _signal(
        "ignore_everything_before",
        0.85,
        rf"\b{_IGNORE}\s+(?:all|everything|anything)\s+(?:that\s+)?(?:\w+\s+){{0,2}}?"
        r"(?:above|before|previously|prior|so\s+far|earlier|"
        r"you\s+(?:were|have\s+been)\s+(?:told|given|instructed)|you\s+know)\b",
    ),
    _signal(
        "disregard_the_above",
        0.5,
        rf"\b{_IGNORE}\s+(?:the\s+|all\s+the\s+)?(?:above|preceding|foregoing)"
        r"(?:\s*$|\s*[.,;:!]|\s+(?:and|instead|then|completely|entirely)\b)",
    ),
    _signal(
        "new_instructions",
        0.5,
        r"\b(?:new|updated|real|actual|true|revised|override)\s+(?:system\s+)?instructions?\s*:"
        r"|\byour\s+(?:new|real|true|actual)\s+(?:task|role|purpose|goal|instructions?|"
        r"objective|mission|directive)\s+(?:is|are|will\s+be)\b",
    ),
    _signal(
        "from_now_on",
        0.2,
        r"\bfrom\s+now\s+on,?\s+(?:you\s+(?:are|will|must|shall|have\s+to|should)|"
        r"act|respond|answer|ignore)\b",
    ),
    _signal(
        "persona_override",
        0.8,
        r"\b(?:you\s+are|you're|youre|act\s+as|acting\s+as|become|pretend\s+(?:to\s+be|you\s+are)|"
        r"role-?play\s+as|play\s+the\s+role\s+of|simulate|transform\s+into)\s+(?:now\s+)?"
        rf"(?:(?:a|an|the)\s+)?{_AI_PERSONA}\b"
        r"|\bdo\s+anything\s+now\b",
    ),
    _signal(
        "jailbreak_marker",
        0.6,
        r"\b(?:you\s+are|you're|youre)\s+(?:now\s+)?(?:jailbroken|freed|liberated|unshackled)\b"
        r"|\byou\s+have\s+been\s+(?:jailbroken|freed|liberated|unshackled|unlocked)\b"
        r"|\bjailbr(?:eak|oken)\s+(?:mode|prompt|ai|assistant|model|version|persona)\b"
        r"|\byou\s+are\s+no\s+longer\s+(?:an?\s+ai|chatgpt|claude|bound|restricted|"
        r"an\s+assistant|limited)\b",
    ),
    # "Developer mode" alone is ordinary phone and browser talk; the jailbreak
    # puts it on the model ("ChatGPT with Developer Mode enabled").
    _signal(
        "developer_mode",
        0.6,
        r"\b(?:chatgpt|gpt|ai|assistant|model|llm|claude|chatbot|bot|you)\s+(?:\w+\s+){0,2}?"
        r"(?:with|in)\s+developer\s+mode\b"
        r"|\bdeveloper\s+mode\s+(?:output|response|answer)s?\b"
        r"|\b(?:simulate|emulate|pretend|act\s+as\s+if|you\s+are\s+in|you're\s+in|youre\s+in)\s+"
        r"(?:\w+\s+){0,2}?developer\s+mode\b",
    ),
    _signal(
        "unsafe_mode_switch",
        0.7,
        r"\b(?:god|jailbreak|unrestricted|unfiltered|uncensored|evil|dan|no\s+restrictions)\s+mode"
        r"\s+(?:is\s+)?(?:enabled|activated|engaged|unlocked|on)\b"
        r"|\b(?:enable|activate|enter|engage|switch\s+to|turn\s+on|unlock)\s+(?:the\s+)?"
        r"(?:god|jailbreak|unrestricted|unfiltered|uncensored|evil|dan)\s+mode\b",
    ),
    _signal(
        "system_prompt_extraction",
        0.85,
        rf"\b{_SHOW}\s+(?:(?:me|us|back|out|all|again|exactly|verbatim|of)\s+)*"
        rf"(?:your|ur)\s+(?:\w+\s+){{0,2}}?{_PROMPT_TARGET}\b",
    ),
    _signal(
        "system_prompt_extraction_weak",
        0.4,
        r"\b(?:reveal|print|output|repeat|recite|dump|leak|expose|disclose|divulge)\s+"
        r"(?:(?:me|us|back|out|all|of)\s+)*the\s+"
        r"(?:system\s*-?\s*prompt|system\s+message|(?:initial|original|hidden|secret)\s+"
        r"(?:instructions|prompt)|pre-?prompt)\b",
    ),
    _signal(
        "repeat_text_above",
        0.8,
        r"\b(?:repeat|print|output|recite|copy|echo|write\s+out|show\s+me|reproduce|dump)\s+"
        r"(?:(?:all|everything|the|of|back)\s+)*"
        r"(?:(?:text|words|content|lines|messages?|instructions|prompt)\s+)?"
        r"(?:above|before\s+(?:this|my|the\s+user)|preceding|prior\s+to\s+(?:this|my))\b"
        r"|\b(?:starting|beginning)\s+with\s+(?:the\s+(?:words?|phrase)\s+)?['\"“]?you\s+are\b",
    ),
    _signal(
        "asks_prior_context",
        0.6,
        r"\bwhat\s+(?:were|have)\s+you\s+(?:been\s+)?(?:told|instructed|programmed|prompted)\b"
        r"|\bwhat\s+(?:instructions|rules|guidelines|directives|prompt)\s+(?:were|have|did)\s+"
        r"you\s+(?:been\s+)?(?:given|told|provided|receive)"
        r"|\b(?:what|how)\s+(?:did|does|do)\s+(?:your\s+(?:developers?|creators?|makers?|"
        r"operators?|owners?)|openai|anthropic|the\s+developers?|the\s+operators?)\s+"
        r"(?:tell|instruct|program|prompt)\s+you\b",
    ),
    _signal(
        "verbatim_request",
        0.3,
        r"\b(?:instructions|prompt|text\s+above|everything\s+above)\b(?:\W+\w+){0,6}?\W+"
        r"(?:verbatim|word\s+for\s+word)\b"
        r"|\b(?:verbatim|word\s+for\s+word)\b(?:\W+\w+){0,6}?\W+(?:instructions|prompt|above)\b",
    ),
    _signal(
        "no_restrictions_roleplay",
        0.45,
        r"\b(?:pretend|imagine|suppose|assume|act\s+as\s+if|act\s+like|hypothetically)\b"
        r"(?:\W+\w+){0,6}?\W+(?:no|without\s+any|without|free\s+of|free\s+from)\s+(?:\w+\s+)?"
        r"(?:restrictions|rules|filters?|guidelines|limits|limitations|censorship|boundaries|"
        r"ethics|morals|content\s+polic(?:y|ies)|safety\s+(?:rules|guidelines|filters?))\b"
        r"|\byou\s+(?:have|has)\s+no\s+(?:\w+\s+)?(?:rules|restrictions|filters|limits|"
        r"guidelines|boundaries|ethics)\b",
    ),
    _signal(
        "unfiltered_persona",
        0.5,
        r"\b(?:unfiltered|uncensored|unrestricted|amoral|jailbroken|unaligned)\s+"
        r"(?:ai|assistant|chatbot|bot|version|model|gpt|chatgpt|persona|response|answers?)\b"
        r"|\b(?:evil|opposite)\s+(?:ai|assistant|chatbot|gpt|chatgpt|claude|model)\b",
    ),
    _signal(
        "never_refuse",
        0.4,
        r"\b(?:never|must\s+not|mustn't|cannot|can't|can\s+not|will\s+not|won't|do\s+not|don't)"
        r"\s+(?:ever\s+)?(?:refuse|decline)\b"
        r"|\bwithout\s+(?:any\s+)?(?:disclaimers?|censorship|moralizing|moralising|"
        r"ethical\s+(?:guidelines|considerations|constraints))\b",
    ),
    _signal("stay_in_character", 0.25, r"\bstay\s+in\s+character\b"),
    _signal(
        "decode_and_follow",
        0.5,
        r"\b(?:decode|decrypt|deobfuscate|unscramble)\b(?:\W+\w+){0,6}?\W+(?:and|then)\s+"
        r"(?:follow|execute|obey|run|carry\s+out|comply\s+with|do\s+what)\b",
    ),
    _signal(
        "prompt_boundary",
        0.5,
        r"\b(?:end|begin|beginning|start)\s+of\s+(?:the\s+)?(?:system\s+prompt|"
        r"system\s+instructions|user\s+input|instructions)\b",
    ),
    # Other languages: the top phrases only, accents already stripped.
    _signal(
        "ignore_previous_instructions_i18n",
        0.85,
        # German
        r"\b(?:ignorier(?:e|en\s+sie)?|vergiss|vergessen\s+sie|missachte|missachten\s+sie|"
        r"uberspringe)\b(?:\W+\w+){0,3}?\W+(?:\w+\W+){0,2}?"
        r"(?:anweisungen|anweisung|instruktionen|befehle|regeln|vorgaben|richtlinien)\b"
        # French
        r"|\b(?:ignore[rz]?|oublie[rz]?|ne\s+tiens\s+pas\s+compte\s+des|"
        r"ne\s+tenez\s+pas\s+compte\s+des|fais\s+abstraction\s+des)\s+(?:\w+\s+){0,2}?"
        r"(?:toutes\s+)?(?:les|tes|vos)\s+(?:\w+\s+)?"
        r"(?:instructions|consignes|regles|directives|ordres|indications)\b"
        # Spanish
        r"|\b(?:ignora|ignore|ignorar|ignoren|olvida|olvide|olvidar|olviden|"
        r"haz\s+caso\s+omiso\s+(?:a|de)|omite|descarta)\s+(?:\w+\s+){0,2}?(?:las|tus|sus)\s+"
        r"(?:\w+\s+)?(?:instrucciones|indicaciones|reglas|ordenes|directrices|normas)\b"
        # Italian
        r"|\b(?:ignora|ignorare|dimentica|dimenticare|tralascia)\s+(?:\w+\s+){0,2}?"
        r"(?:le|tue)\s+(?:\w+\s+)?(?:istruzioni|regole|indicazioni|direttive)\b"
        # Portuguese
        r"|\b(?:ignore|ignora|ignorar|esqueca|esquece|desconsidere)\s+(?:\w+\s+){0,2}?"
        r"(?:as|suas)\s+(?:\w+\s+)?(?:instrucoes|regras|orientacoes|diretrizes)\b"
        # Dutch
        r"|\b(?:negeer|vergeet)\s+(?:\w+\s+){0,3}?"
        r"(?:instructies|regels|opdrachten|richtlijnen|aanwijzingen)\b"
        # Russian
        r"|(?:игнорируй|игнорируйте|проигнорируй|забудь|забудьте)\s+(?:\w+\s+){0,2}?"
        r"(?:инструкции|указания|правила|команды)"
        # Chinese
        r"|(?:忽略|无视|忽视|忘记|不要理会)(?:之前|以前|先前|上面|上述|前面|以上|你的)?的?"
        r"(?:所有|全部|一切)?的?(?:指令|指示|说明|规则|提示|设定)"
        # Japanese
        r"|(?:以前|前|上記|これまで|今まで)の(?:すべての|全ての)?(?:指示|命令|ルール|プロンプト)を"
        r"(?:無視|忘れ)",
    ),
    _signal(
        "system_prompt_extraction_i18n",
        0.8,
        # German
        r"\b(?:zeig|zeige|gib|nenne|verrate|wiederhole|drucke)[\w-]*\s+(?:\w+\s+){0,2}?"
        r"(?:deinen|deine|ihren|ihre)\s+(?:system\s*-?\s*prompt|systemprompt|"
        r"systemanweisungen|anfangsanweisungen|anweisungen|systemnachricht)\b"
        # French
        r"|\b(?:montre|affiche|revele|repete|donne|ecris|imprime)[\w-]*\s+(?:\w+\s+){0,2}?"
        r"(?:ton|ta|tes|votre|vos)\s+(?:prompt|invite|instructions|consignes|message\s+systeme)\b"
        # Spanish
        r"|\b(?:muestra|muestrame|revela|repite|dime|escribe|imprime|dame)[\w-]*\s+"
        r"(?:\w+\s+){0,2}?(?:tu|tus)\s+(?:prompt|instrucciones|mensaje\s+del\s+sistema|"
        r"indicaciones)\b"
        # Chinese
        r"|(?:告诉我|显示|输出|重复|打印|透露|泄露|给我看|展示)(?:一下)?(?:你的)?"
        r"(?:系统提示词?|系统指令|初始指令|原始指令)",
    ),
)

# Whether any of them matches, in one scan of ~4 us instead of 24 of ~2 us:
# the alternatives share their leading letters (chat/safety/regexes.py). They
# are all compiled without flags, so one pattern can hold them.
_ANY_LANGUAGE_SIGNAL = shared_prefixes(
    re.compile("|".join(f"(?:{s.plain.pattern})" for s in _LANGUAGE_SIGNALS))
)

# Chat-template and transcript markers, matched on text that keeps newlines.
_TAG_SIGNALS: tuple[_Signal, ...] = (
    _signal(
        "fake_role_tag",
        0.75,
        r"<\|\s*(?:im_start|im_end|im_sep|endoftext|system|assistant|start_header_id|"
        r"end_header_id|eot_id|begin_of_text)\s*\|>"
        r"|\[/?inst\]|<<\s*/?sys\s*>>"
        r"|<\s*/?\s*(?:system|system_prompt|sys_prompt|developer_message)\s*>"
        r"|^[ \t]*#{2,}[ \t]*(?:system|developer)(?:[ \t]+(?:prompt|message|override))?[ \t]*:",
        re.MULTILINE,
    ),
    _signal(
        "fake_instruction_header",
        0.4,
        r"^[ \t]*#{2,}[ \t]*(?:instructions?|assistant|response)[ \t]*:"
        r"|^[ \t]*(?:system|sys)[ \t]*(?:prompt|message|override|instructions?)[ \t]*:",
        re.MULTILINE,
    ),
    _signal(
        "fake_transcript",
        0.4,
        r"^[ \t]*(?:human|user)[ \t]*:[^\n]*\n(?:[^\n]*\n){0,20}?[ \t]*(?:assistant|ai)[ \t]*:",
        re.MULTILINE,
    ),
)

# Whether any of them matches, in one scan (as for the language signals).
_ANY_TAG_SIGNAL = shared_prefixes(
    re.compile("|".join(f"(?:{s.plain.pattern})" for s in _TAG_SIGNALS), re.MULTILINE)
)

# --- Folding -----------------------------------------------------------------

# Format characters (Cf) that render as nothing: zero-width, bidi controls,
# soft hyphen, Arabic and Syriac format marks. TAG characters are decoded
# separately because they hide ASCII.
_FORMAT_CHARS = re.compile(
    "[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000e0000\U000e0001\U000e007f]"
)
_TAG_RUN = re.compile("[\U000e0020-\U000e007e]+")

# Letters of other scripts that look like a Latin letter, after Unicode's
# confusables list (confusables.txt), limited to those that pass for the
# Latin letter in ordinary fonts: small-capital shapes (Cyrillic ka, em, en,
# te, ve; Greek kappa, tau) and near misses (Greek epsilon) are left out, so
# that fewer words of real Russian or Greek have a Latin twin. Both cases are
# listed because the fold runs before casefolding. Written as escapes: the
# letters themselves cannot be told from the Latin ones on screen.
_CONFUSABLE_PAIRS = (
    # Cyrillic
    ("\u0405\u0406\u0408\u0410\u0412\u0415\u041a\u041c", "SIJABEKM"),
    ("\u041d\u041e\u0420\u0421\u0422\u0423\u0425\u0430", "HOPCTYXa"),
    ("\u0435\u043e\u0440\u0441\u0443\u0445\u0455\u0456", "eopcyxsi"),
    ("\u0458\u0475\u04ae\u04af\u04ba\u04bb\u04c0\u04cf", "jvYyHhll"),
    ("\u0500\u0501\u051a\u051b\u051c\u051d", "DdQqWw"),
    # Greek
    ("\u037f\u0391\u0392\u0395\u0396\u0397\u0399\u039a", "JABEZHIK"),
    ("\u039c\u039d\u039f\u03a1\u03a4\u03a5\u03a7\u03b1", "MNOPTYXa"),
    ("\u03b3\u03b9\u03bd\u03bf\u03c1\u03c5\u03c7\u03f2", "yivopuxc"),
    ("\u03f3\u03f9", "jC"),
    # Armenian
    ("\u054d\u054f\u0555\u0566\u0570\u0578\u057d\u0581", "USOqhnug"),
    ("\u0585", "o"),
    # Cherokee, capital and small
    ("\u13a2\u13aa\u13ab\u13ac\u13b3\u13b7\u13bb\u13c0", "TAJEWMHG"),
    ("\u13c3\u13d9\u13da\u13de\u13df\u13e2\u13e6\u13f4", "ZVSLCPKB"),
    ("\uab72\uab7a\uab7b\uab7c\uab83\uab87\uab8b\uab90", "TAJEWMHG"),
    ("\uab93\uaba9\uabaa\uabae\uabaf\uabb2\uabb6", "ZVSLCPK"),
    # Lisu
    ("\ua4d0\ua4d1\ua4d3\ua4d4\ua4d6\ua4d7\ua4d9\ua4da", "BPDTGKJC"),
    ("\ua4dc\ua4dd\ua4df\ua4e0\ua4e1\ua4e2\ua4e3\ua4e6", "ZFMNLSRV"),
    ("\ua4e7\ua4ea\ua4eb\ua4ec\ua4ee\ua4f0\ua4f2\ua4f3", "HWXYAEIO"),
    ("\ua4f4", "U"),
    # Latin letters that NFKC leaves as they are
    ("\u0131\u0237\u0251\u0261\u0269\u028b", "ijagiu"),
)
_CONFUSABLES = {
    look_alike: latin
    for look_alikes, latins in _CONFUSABLE_PAIRS
    for look_alike, latin in zip(look_alikes, latins, strict=True)
}
_UNCONFUSE = str.maketrans(_CONFUSABLES)
# A word (letters, digits, underscores) whose every letter is Latin or has a
# Latin twin, with at least one twin in it: "b\u043emb" (Cyrillic o) or
# "\u0440\u0456\u0440\u0435" (all Cyrillic). A word with any other letter is
# left as written: real Russian or Greek nearly always has one.
_TWIN = "".join(sorted(_CONFUSABLES))
_TWIN_CHAR = re.compile(f"[{_TWIN}]")
_DISGUISED_WORD = re.compile(rf"(?<!\w)[A-Za-z0-9_{_TWIN}]*?[{_TWIN}][A-Za-z0-9_{_TWIN}]*(?!\w)")
# Markdown emphasis and code marks, deleted from the flat fold (also inside
# words, "pi**pe bo**mb"), and inline HTML that does the same.
_MARKUP_CHARS = "*_`~^"
_DELETE_MARKUP = str.maketrans("", "", _MARKUP_CHARS)
_HTML_EMPHASIS = re.compile(r"</?(?:b|i|u|s|em|strong|del|ins|mark|code|kbd|sub|sup|tt)>")
_LATIN_ACCENTS = re.compile("(?<=[a-z])[\u0300-\u036f]+")
_HORIZONTAL_WHITESPACE = re.compile(r"[^\S\n]+")
_LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
# A leet symbol next to a letter. Both patterns below begin with what they
# match, not with a lookbehind, so a scan skips every other character at once
# instead of trying the lookbehind at each one (same matches:
# tests/safety/test_regexes.py).
_LEET_CHAR = re.compile(r"[013457@$](?:(?<=[a-z].)|(?=[a-z]))")
# Four or more single letters separated by one space or punctuation mark, the
# first one not preceded by a letter, digit or underscore.
_SPACED_LETTERS = re.compile(r"[a-z](?<!\w[a-z])(?:[ .\-_*][a-z]){3,}(?!\w)")
_SPACED_SEPARATOR = re.compile(r"[ .\-_*]")
# Inside every such run, two lone letters in a row stand between separators
# ("k e y l" holds " e y "). A scan for that tests separators, not every
# letter: a text without it (nearly every text) skips _SPACED_LETTERS, which
# costs ~2 us on an output window of ~90 characters, a third of its check.
_SPACED_HINT = re.compile(r"[ .\-_*][a-z][ .\-_*][a-z][ .\-_*]")

# --- Encoded payloads --------------------------------------------------------

_BASE64_BLOB = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{40,}={0,2}(?![A-Za-z0-9+/=_-])")
_MAX_BLOBS = 3
_BLOB_WEIGHT = 0.25
_DECODED_TEXT_WEIGHT = 0.3
_HIDDEN_TAGS_WEIGHT = 0.5


def injection_score(text: str) -> InjectionVerdict:
    """Return how much `text` looks like a prompt-injection attempt, and why."""
    return _score(text, decode_blobs=True)


def _score(text: str, *, decode_blobs: bool) -> InjectionVerdict:
    weights: dict[str, float] = {}

    # Invisible ASCII look-alikes are legitimate only inside flag emoji (two
    # to five tags), so a run of six or more is a hidden message.
    if any(len(run) >= 6 for run in _TAG_RUN.findall(text)):
        weights["hidden_tag_characters"] = _HIDDEN_TAGS_WEIGHT
    lines, folded, squashed = fold_variants(text)

    if _ANY_TAG_SIGNAL.search(lines):
        for signal in _TAG_SIGNALS:
            if signal.pattern.search(lines):
                weights[signal.name] = signal.weight
    for variant in (folded,) if squashed == folded else (folded, squashed):
        # Most messages match no signal: one scan tells, instead of one a signal.
        if not _ANY_LANGUAGE_SIGNAL.search(variant):
            continue
        for signal in _LANGUAGE_SIGNALS:
            if signal.name not in weights and signal.pattern.search(variant):
                weights[signal.name] = signal.weight

    if decode_blobs:
        _score_blobs(text, weights)

    # In definition order, whatever order they were found in: the same
    # product to the last bit, and verdicts stable across runs.
    signals = tuple(sorted(weights, key=_signal_order))
    remaining = 1.0
    for name in signals:
        remaining *= 1.0 - weights[name]
    score = round(1.0 - remaining, 4)
    return InjectionVerdict(score=score, signals=signals)


def _score_blobs(text: str, weights: dict[str, float]) -> None:
    for found, match in enumerate(_BASE64_BLOB.finditer(text)):
        if found >= _MAX_BLOBS:
            break
        blob = match.group()
        # Hex digests, long words and numbers are not base64 payloads: demand
        # the mixed-case-and-digits look of real base64.
        if not (
            any(c.isupper() for c in blob)
            and any(c.islower() for c in blob)
            and any(c.isdigit() for c in blob)
        ):
            continue
        weights["base64_blob"] = _BLOB_WEIGHT
        decoded = _decode_base64_text(blob)
        if decoded is None:
            continue
        weights["base64_text"] = _DECODED_TEXT_WEIGHT
        inner = _score(decoded, decode_blobs=False)
        if inner.score >= SUSPICIOUS_SCORE:
            weights["encoded_injection"] = max(weights.get("encoded_injection", 0.0), inner.score)


def _decode_base64_text(blob: str) -> str | None:
    bare = blob.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(bare + "=" * (-len(bare) % 4), validate=True)
        decoded = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    # Prose, not JSON or binary: JWT payloads and key material decode to
    # compact JSON or bytes and are not a hidden message.
    wordy = sum(1 for c in decoded if c.isalpha() or c == " ")
    if decoded.count(" ") < 3 or wordy / len(decoded) < 0.7:
        return None
    return decoded


def _fold_keep_lines(text: str) -> str:
    if text.isascii():
        # Every step below but the last leaves ASCII as it is (casefold is
        # lower for ASCII): the common case skips four passes.
        return _HORIZONTAL_WHITESPACE.sub(" ", text.lower())
    text = unicodedata.normalize("NFKC", text)
    text = _TAG_RUN.sub(_untag, text)
    text = _FORMAT_CHARS.sub("", text)
    if _TWIN_CHAR.search(text):
        text = _DISGUISED_WORD.sub(_unconfuse, text)
    text = text.casefold()
    text = unicodedata.normalize("NFKD", text)
    text = _LATIN_ACCENTS.sub("", text)
    text = unicodedata.normalize("NFC", text)
    return _HORIZONTAL_WHITESPACE.sub(" ", text)


def _untag(match: re.Match[str]) -> str:
    return " " + "".join(chr(ord(c) - 0xE0000) for c in match.group()) + " "


def _unconfuse(match: re.Match[str]) -> str:
    return match.group().translate(_UNCONFUSE)


def _unmark(text: str) -> str:
    """Return `text` without Markdown emphasis and code marks (or inline HTML ones)."""
    # A test for each mark costs less than one pass that deletes none.
    if any(mark in text for mark in _MARKUP_CHARS):
        text = text.translate(_DELETE_MARKUP)
    if "==" in text:
        text = text.replace("==", "")
    if "<" in text:
        text = _HTML_EMPHASIS.sub("", text)
    return text


def _fold_flat(text: str) -> str:
    """Fold like _fold_keep_lines, without markup, every whitespace run one space, stripped."""
    if text.isascii():
        return " ".join(_unmark(text.lower()).split())
    return " ".join(_unmark(_fold_keep_lines(text)).split())


def _squash(folded: str) -> str:
    squashed = _LEET_CHAR.sub(_unleet, folded)
    if _SPACED_HINT.search(squashed) is None:
        return squashed
    return _SPACED_LETTERS.sub(_unspace, squashed)


def _unleet(match: re.Match[str]) -> str:
    return _LEET[match.group()]


def _unspace(match: re.Match[str]) -> str:
    return _SPACED_SEPARATOR.sub("", match.group())


@functools.lru_cache(maxsize=32)
def fold_variants(text: str) -> tuple[str, str, str]:
    """Return `text` folded with its lines kept, folded flat, and squashed.

    A user's message is scored for injection and then moderated, and both
    fold it the same way: the moderation finds the message's folds here.
    """
    lines = _fold_keep_lines(text)
    # Whitespace runs as one space (str.isspace is re's \s), as _fold_flat does.
    folded = " ".join(_unmark(lines).split())
    return lines, folded, _squash(folded)


_ORDER = {
    name: index
    for index, name in enumerate(
        ["hidden_tag_characters"]
        + [s.name for s in _TAG_SIGNALS]
        + [s.name for s in _LANGUAGE_SIGNALS]
        + ["base64_blob", "base64_text", "encoded_injection"]
    )
}


def _signal_order(name: str) -> int:
    return _ORDER[name]
