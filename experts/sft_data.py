"""Training data for chat experts: shaping source rows into chat answers, and a stable held-out split.

Source rows come in the shape of their benchmark, not of a chat reply: an MMLU row's answer is
the text of its correct option ("the law.", "True, False"), a GSM8K solution ends in
``#### 60`` and carries calculator marks (``<<16*10=160>>``). An expert trained on those learns
to answer in option fragments. :func:`shape_pair` turns each row into the answer a chat user
expects (an option completes its stem into a sentence, or answers a factoid question), and drops
rows that cannot stand without their options or would teach an expert to echo the question.

The held-out split is fixed by a hash of the question (:func:`heldout_bucket`), so it does not
move when rows are added, reordered or trained with another seed, and the same question never
sits on both sides (duplicates hash alike).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

HELDOUT_FRACTION = 0.1
"""Share of questions (by hash) kept out of training: 60 or more rows in each demo vertical
(the smallest has 920)."""

_FUNCTION_WORDS = frozenset(
    """
a an the and or but if of to in on at by for with from as is are was were be been being am do does did
it its this that these those there here what which who whom whose when where why how can
could should would will shall may might must i you he she we they me him her us them my your our their
s t so than then too very just also about into over under up down out answer
""".split()
)
"""Words that restate a question without answering it."""

SENTENCE_MIN_WORDS = 4
"""An option of this many words that ends like a sentence is already a full answer."""

COMPLETION_MAX_WORDS = 24
"""A stem longer than this is context followed by a question, not one sentence to complete:
completing it would copy the whole context into the answer."""

NEW_WORDS_MIN = 2
"""A stem completed with an option must gain at least this many meaningful words: "... is the
principle of practical guidance." for a stem that already says "practical" only copies it."""

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_FINAL_NUMBER = re.compile(r"\n?####\s*(.+?)\s*$")
_WORD = re.compile(r"\w+", re.UNICODE)
_FIRST_SENTENCE = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class ShapedPair:
    """A question and the chat answer made from its source row."""

    question: str
    answer: str
    source: str


def normalise(text: str) -> str:
    """Lower-case words joined by single spaces (punctuation and accents' forms folded)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_WORD.findall(text))


def heldout_bucket(question: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """True when ``question`` belongs to the held-out split (a hash of its normalised text)."""
    digest = hashlib.sha256(normalise(question).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def hash_order(question: str) -> bytes:
    """Sort key that orders held-out questions the same way on every run."""
    return hashlib.sha256(normalise(question).encode("utf-8")).digest()


def split_by_hash(pairs: Sequence, fraction: float = HELDOUT_FRACTION) -> tuple[list, list]:
    """(train, held-out) by :func:`heldout_bucket`; held-out rows in hash order."""
    train = [p for p in pairs if not heldout_bucket(p.question, fraction)]
    heldout = sorted((p for p in pairs if heldout_bucket(p.question, fraction)), key=lambda p: hash_order(p.question))
    return train, heldout


# ---------------------------------------------------------------- answer checks


def echoes(question: str, answer: str) -> bool:
    """True when the answer only restates the question: every word of it that carries meaning
    (not a function word) is already in the question. "Baseball is the most popular
    sport in Japan" answers its question; "What causes high blood pressure?" echoes it."""
    return bool(normalise(answer)) and not brings_new_word(asked_words(question), answer)


def asked_words(question: str) -> frozenset[str]:
    """The question's normalised words: an answer made only of these and function words echoes it."""
    return frozenset(normalise(question).split())


def brings_new_word(asked: frozenset[str], answer: str, complete: bool = True) -> bool:
    """True when the answer holds a meaningful word the question lacks. With ``complete=False``
    the answer is still being written and its last word may be cut short, so it does not count
    unless the text already ends after it."""
    words = normalise(answer).split()
    if not complete and words and answer[-1:].isalnum():
        words = words[:-1]
    return any(word not in asked and word not in _FUNCTION_WORDS for word in words)


def meaningful_words(text: str) -> list[str]:
    """The words of ``text`` that carry meaning (function words left out), normalised."""
    return [word for word in normalise(text).split() if word not in _FUNCTION_WORDS]


def adds_to(stem: str, option: str) -> bool:
    """True when ``option`` brings at least :data:`NEW_WORDS_MIN` meaningful words ``stem`` lacks."""
    asked = set(normalise(stem).split())
    return len(set(meaningful_words(option)) - asked) >= NEW_WORDS_MIN


def is_empty(answer: str) -> bool:
    """True when the answer has no word or number in it."""
    return not _WORD.search(answer)


def loops(answer: str, max_period: int = 24) -> bool:
    """True when the answer repeats itself: a run of 1-``max_period`` words three times in a row,
    or the same sentence of four or more words twice."""
    words = normalise(answer).split()
    for period in range(1, min(max_period, len(words) // 3) + 1):
        for start in range(0, len(words) - 3 * period + 1):
            chunk = words[start : start + period]
            if chunk == words[start + period : start + 2 * period] == words[start + 2 * period : start + 3 * period]:
                return True
    sentences = [normalise(s) for s in re.split(r"(?<=[.!?])\s+|\n+", answer)]
    seen: set[str] = set()
    for sentence in sentences:
        if len(sentence.split()) >= SENTENCE_MIN_WORDS:
            if sentence in seen:
                return True
            seen.add(sentence)
    return False


def degenerate(question: str, answer: str) -> str | None:
    """Why an answer is degenerate (``"empty"``, ``"echo"``, ``"loop"``), or None when it is not."""
    if is_empty(answer):
        return "empty"
    if echoes(question, answer):
        return "echo"
    if loops(answer):
        return "loop"
    return None


# ---------------------------------------------------------------- shaping


def _sentence(text: str) -> str:
    """``text`` with a capital first letter and a closing full stop."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?)\"'`" else text + "."


def _reads_as_sentence(option: str) -> bool:
    words = option.split()
    return len(words) >= SENTENCE_MIN_WORDS and option.rstrip()[-1:] in ".!?" and option[:1].isupper()


_BLANK = re.compile(r"_{1,}")
_POINTS_AT_OPTIONS = re.compile(
    r"^(both|all|none|neither)( of)?( the)? (above|these|of these|of the above|of them)\b|"
    r"^(both|neither) \(?[a-d]\)? (and|nor) \(?[a-d]\)?\b",
    re.IGNORECASE,
)
_LABELS = frozenset({"true", "false", "wrong", "not wrong", "yes", "no", "correct", "incorrect"})
_FACTOID = re.compile(r"^(who|what|when|where|which|how many|how much|in what|in which)\b", re.IGNORECASE)


def needs_other_options(option: str) -> bool:
    """True when an option means nothing without the others: "Both of these", "All of the above",
    "Neither A nor B", or a row of labels such as "Wrong, Not wrong" (one per scenario)."""
    if _POINTS_AT_OPTIONS.match(option.strip()):
        return True
    parts = [normalise(part) for part in option.split(",")]
    return all(part in _LABELS for part in parts)


def option_answer(question: str, option: str) -> str | None:
    """A multiple-choice option as a chat answer, or None when it cannot stand as one.

    An option that reads as a sentence stays as it is. A stem that is a sentence to complete
    ("Averaging the output of multiple decision trees helps _.", "The term 'emotion work' refers
    to:") is completed with the option, blank filled. The option of a factoid question ("In what
    year did the Great Depression begin?") is the short answer a person gives ("1929."). Anything
    else ("Which of the following is true?" with "True, False") needs the options it came with,
    and is dropped, as is an option that points at the others ("Both of these") and a stem that is
    context plus a question rather than one sentence (a scenario, a long passage)."""
    option, stem = option.strip().rstrip("."), question.strip()
    if needs_other_options(option):
        return None
    if _reads_as_sentence(option + "."):
        return option + "."
    if "\n" in stem or stem.lower().startswith(("which of the following", "this question refers")):
        return None
    if "?" in stem.rstrip("?") or len(stem.split()) > COMPLETION_MAX_WORDS:
        return None
    if not stem.endswith("?"):
        if not adds_to(stem, option):
            return None
        if _BLANK.search(stem):
            return _sentence(_BLANK.sub(lambda _: option, stem, count=1))
        return _sentence(stem.rstrip(":").rstrip() + " " + option)
    if _FACTOID.match(stem):
        return _sentence(option)
    return None


def solution_answer(solution: str) -> str:
    """A GSM8K solution as a chat answer: calculator marks removed, ``#### N`` as a last sentence."""
    text = _CALCULATOR.sub("", solution).strip()
    match = _FINAL_NUMBER.search(text)
    if match:
        text = text[: match.start()].rstrip() + f"\nThe answer is {match.group(1)}."
    return text


def shape_answer(question: str, answer: str, source: str) -> str | None:
    """The chat answer for one source row's answer (by the row's ``source``), or None when the row
    has no answer that can stand alone."""
    family = source.split("/", 1)[0]
    if family == "mmlu":
        return option_answer(question, answer)
    if family == "gsm8k":
        return solution_answer(answer)
    if family in ("truthfulqa", "medquad"):
        return _sentence(answer)
    return answer.strip()


def without_restated_opening(question: str, answer: str) -> str:
    """``answer`` less a first sentence that restates the question or asks one (MedQuAD answers often
    open with "What are the signs and symptoms of X?"), when something follows it."""
    parts = _FIRST_SENTENCE.split(answer.strip(), maxsplit=1)
    if len(parts) == 2 and parts[1].strip() and (echoes(question, parts[0]) or parts[0].endswith("?")):
        return parts[1].strip()
    return answer


def shape_pair(question: str, answer: str, source: str = "") -> ShapedPair | None:
    """The row as a chat question and answer, or None when it would teach an expert to echo the
    question (its answer restates the question) or to say nothing."""
    question = question.strip()
    shaped = shape_answer(question, answer, source)
    if shaped is None:
        return None
    shaped = without_restated_opening(question, shaped)
    if is_empty(shaped) or echoes(question, shaped):
        return None
    return ShapedPair(question, shaped, source)


def shape_pairs(rows: Iterable[tuple[str, str, str]]) -> tuple[list[ShapedPair], int]:
    """(shaped pairs, rows dropped) for ``(question, answer, source)`` rows."""
    shaped, dropped = [], 0
    for question, answer, source in rows:
        pair = shape_pair(question, answer, source)
        if pair is None:
            dropped += 1
        else:
            shaped.append(pair)
    return shaped, dropped
