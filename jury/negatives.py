"""Wrong answers made from right ones: the failures a cross-check meets that labelled sets lack.

Every labelled set pairs a question with an on-topic answer, so a calibrator fitted on them alone
never sees an answer to another question, and can rate "Paris" as the boiling point of water
correct. :func:`constructed_negatives` makes, from correct rows:

* ``swapped_<source>``: the question with the correct answer of another question of the same
  source (and domain, where the source has several questions of it);
* ``swapped_cross``: the question with the correct answer of a question from another domain (from
  another source, for a row without a domain);
* ``perturbed_<source>``: the correct answer with one fact changed: a number moved, or a year or
  a named entity replaced by one taken from another row's answer.

Rows are made only from the rows given (the caller passes training rows when training, and the
evaluated rows when evaluating), each with an id that names the rows it came from.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

SWAPPED = "swapped_"
PERTURBED = "perturbed_"
CROSS_DOMAIN = "swapped_cross"

_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\w])")
_YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")
_CAPITALISED = re.compile(r"\b([A-Z][a-z]+(?:\s+[A-Z][a-z]+)*)")


class NegativesConfig(BaseModel):
    """How many constructed wrong answers join the labelled rows."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    swapped_share: float = Field(0.5, ge=0.0, le=5.0)
    """Answers moved to another question of the same source, per correct row."""

    cross_share: float = Field(0.25, ge=0.0, le=5.0)
    """Answers moved to a question of another domain, per correct row."""

    perturbed_share: float = Field(0.25, ge=0.0, le=5.0)
    """Correct answers with one fact changed, per correct row that has a fact to change."""

    seed: int = 0
    """Seed of which rows are used and what replaces what."""


def constructed_negatives(rows: Sequence, config: NegativesConfig | None = None) -> list:
    """Wrong answers made from the correct rows of ``rows`` (``jury.crosscheck.CheckRow``)."""
    config = config or NegativesConfig()
    rng = random.Random(config.seed)
    correct = [r for r in rows if r.label == 1]
    out = []
    out += _swaps(correct, config.swapped_share, rng, cross_domain=False)
    out += _swaps(correct, config.cross_share, rng, cross_domain=True)
    out += _perturbations(correct, config.perturbed_share, rng)
    return out


def origin_digest(row) -> str | None:
    """The digest of the correct row a constructed row was made from (None for a labelled row)."""
    if row.id and "~" in row.id:
        return row.id.split("~", 1)[0]
    return None


def is_constructed(source: str) -> bool:
    return source.startswith(SWAPPED) or source.startswith(PERTURBED)


def _pick(rows: Sequence, share: float, rng: random.Random) -> list:
    """``share`` x len(rows) rows: every row once per whole part of ``share``, a sample for the rest."""
    rows = list(rows)
    whole, rest = divmod(share, 1.0)
    return rows * int(whole) + rng.sample(rows, round(rest * len(rows)))


def entities(text: str) -> list:
    """Capitalised names in ``text`` (matches), a sentence's opening function word left out."""
    from experts.sft_data import _FUNCTION_WORDS

    return [m for m in _CAPITALISED.finditer(text) if m.group(1).split()[0].lower() not in _FUNCTION_WORDS]


def _swaps(correct: Sequence, share: float, rng: random.Random, cross_domain: bool) -> list:
    from jury.crosscheck import CheckRow

    by_source: dict[str, list] = defaultdict(list)
    by_source_domain: dict[tuple[str, str | None], list] = defaultdict(list)
    for row in correct:
        by_source[row.source].append(row)
        by_source_domain[(row.source, row.domain)].append(row)
    out = []
    for row in _pick(correct, share, rng):
        if cross_domain:
            # a row without a domain takes an answer from another source instead
            pool = [r for r in correct if (r.domain != row.domain if row.domain else r.source != row.source)]
            source = CROSS_DOMAIN
        else:
            same_domain = by_source_domain[(row.source, row.domain)]
            pool = same_domain if len(same_domain) > 1 else by_source[row.source]
            source = SWAPPED + row.source
        other = _other(pool, row, rng)
        if other is None:
            continue
        out.append(
            CheckRow(
                question=row.question,
                answer=other.answer,
                label=0,
                source=source,
                domain=row.domain,
                id=f"{row.digest()}~swap~{other.digest()}",
            )
        )
    return out


def _other(pool: Sequence, row, rng: random.Random):
    """A row of ``pool`` with another question and another answer, or None."""
    for _ in range(8):
        if not pool:
            return None
        other = pool[rng.randrange(len(pool))]
        if other.question != row.question and other.answer.strip().lower() != row.answer.strip().lower():
            return other
    return None


def _perturbations(correct: Sequence, share: float, rng: random.Random) -> list:
    from jury.crosscheck import CheckRow

    years = sorted({m.group(1) for r in correct for m in _YEAR.finditer(r.answer)})
    names = sorted({m.group(1) for r in correct for m in entities(r.answer)})
    changeable = [r for r in correct if _NUMBER.search(r.answer) or entities(r.answer)]
    out = []
    for row in _pick(changeable, share, rng):
        changed = perturb(row.answer, rng, years, names)
        if changed is None or changed == row.answer:
            continue
        out.append(
            CheckRow(
                question=row.question,
                answer=changed,
                label=0,
                source=PERTURBED + row.source,
                domain=row.domain,
                id=f"{row.digest()}~perturb~{rng.randrange(1 << 30)}",
            )
        )
    return out


def perturb(answer: str, rng: random.Random, years: Sequence[str] = (), names: Sequence[str] = ()) -> str | None:
    """``answer`` with one fact changed: its last year replaced by another row's year, else its last
    number moved (by 1-9, doubled or halved), else a named entity replaced by another row's; None
    when it has none of these."""
    year = list(_YEAR.finditer(answer))
    if year and len(years) > 1:
        match = year[-1]
        replacement = rng.choice([y for y in years if y != match.group(1)])
        return answer[: match.start()] + replacement + answer[match.end() :]
    numbers = list(_NUMBER.finditer(answer))
    if numbers:
        match = numbers[-1]
        value = int(match.group(1).replace(",", ""))
        moved = rng.choice(
            [
                value + rng.randint(1, 9),
                value * 2 + 1,
                max(0, value - rng.randint(1, 9)),
                value // 2 if value > 3 else value + 10,
            ]
        )
        if moved == value:
            moved = value + 1
        text = f"{moved:,}" if "," in match.group(1) else str(moved)
        return answer[: match.start()] + text + (match.group(2) or "") + answer[match.end() :]
    found = entities(answer)
    options = [name for name in names if found and name != found[-1].group(1)]
    if found and options:
        match = found[-1]
        return answer[: match.start()] + rng.choice(options) + answer[match.end() :]
    return None
