"""The cross-check jury: small experts judge an answer that came from a large model.

For a question and a candidate answer, the router picks the ``k`` most relevant active experts;
the base model sits on every jury as a reference. Each juror gives likelihood evidence (mean
log-prob of the answer given the question, without it, and their difference, PMI), computed in
one batched pass through the expert pool. Optionally each juror also answers the question
itself, and the candidate's place in the agreement graph (``networkx``; an edge where MiniLM
similarity passes a threshold) is one more piece of evidence. Jurors are weighted by reputation
(Beta posteriors on how often their vote was right, on right and on wrong answers apart: a
balanced accuracy), and a calibrator turns the weighted evidence into P(correct). A calibrator
may also carry a truthfulness probe (:mod:`jury.probe`): a linear read-out of the base
model's hidden states over the answer, taken from the same scoring pass.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from experts.types import BASE_EXPERT, ChatMessage, ExpertScore, GenerationRequest, SamplingParams
from jury.calibrator import FEATURES, PROBE_FEATURE, Calibrator
from jury.checks import text_checks
from registry.errors import MoseError, ServerError
from registry.service import Reputation

Embedder = Callable[[Sequence[str]], np.ndarray]
"""Texts -> L2-normalised embeddings (MiniLM in production)."""


class JuryConfig(BaseModel):
    """How juries are formed and weighted."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    k: int = Field(3, ge=0, le=16)
    """Experts on the jury besides the base model."""

    reputation_sharpness: float = Field(12.0, ge=0.0)
    """Weight = exp(sharpness * (balanced accuracy - 0.5)): a juror no better than a coin, or
    one that always votes the same way, weighs 1."""

    reputation_prior: tuple[float, float] = (2.0, 2.0)
    """Beta prior (successes, failures) of a juror with no feedback yet, for each half of its
    reputation (votes on answers that were correct, and on answers that were wrong)."""

    similarity_threshold: float = Field(0.6, ge=-1.0, le=1.0)
    """MiniLM cosine similarity above which two answers agree (an edge in the agreement graph)."""

    own_answer_tokens: int = Field(48, ge=1, le=256)
    """Length of each juror's own answer when own answers are asked for."""

    max_answer_chars: int = Field(20_000, ge=1)
    """Longer answers are cut (the scorer also truncates by tokens)."""

    adapters_read_question: bool | None = None
    """Whether a LoRA juror's adapter reads the question too (True), or applies only where answer
    tokens are predicted, the question being read once by the base model for all jurors (False:
    about 1.2x faster on short answers, and as good a judge on crosscheck_dev when paired on the
    same rows). None: as the calibrator's evidence was collected (False without a calibrator).
    Evidence differs between the two, so a calibrator refuses the other."""


class JurorEvidence(BaseModel):
    """What one juror says about the candidate answer."""

    expert: str
    domain: str | None = None
    weight: float = 1.0
    logp_given_question: float
    logp_without_question: float
    pmi: float
    answer_tokens: int
    own_answer: str | None = None
    similarity: float | None = None
    vote: bool | None = None
    """Whether this juror's evidence alone says 'correct' (see :meth:`Jury.cast_votes`)."""
    answer_state: list[float] | None = Field(None, exclude=True, repr=False)
    """The base model's mean hidden state over the answer (:attr:`ExpertScore.answer_state`),
    when the calibrator's truthfulness probe reads one; not part of the verdict."""


class Verdict(BaseModel):
    """The jury's verdict on one answer."""

    id: str
    p_correct: float
    flagged: bool
    threshold: float
    jurors: list[JurorEvidence]
    agreement: bool | None = None
    """Whether the candidate sits in the largest cluster of the agreement graph (own answers only)."""
    calibrator: str | None = None
    """Version of the calibrator used (None: uncalibrated fallback)."""
    evidence: dict[str, float] = Field(default_factory=dict)
    """The aggregated features the calibrator saw."""


def reliability_weight(reputation: Reputation, sharpness: float) -> float:
    """exp(sharpness * (balanced accuracy - 0.5)): balanced, so that a juror that always votes
    "wrong" does not gain weight from feedback on a stream of mostly wrong answers."""
    return math.exp(sharpness * (reputation.mean - 0.5))


def features(
    jurors: Sequence[JurorEvidence], question: str, checks: dict[str, float], agreement: bool | None
) -> dict[str, float]:
    """Composition-independent evidence (reputation-weighted means over the experts, the base
    model's own, their contrast), the item's format, their interactions, and ``checks``, the
    outcomes of :func:`jury.checks.text_checks` on the answer (:data:`FEATURES`)."""
    base = next((j for j in jurors if j.expert == BASE_EXPERT), None)
    experts = [j for j in jurors if j.expert != BASE_EXPERT] or ([base] if base else [])
    if base is None or not experts:
        raise MoseError("a jury needs the base model's evidence")
    weights = np.array([max(j.weight, 1e-6) for j in experts])
    weights = weights / weights.sum()
    pmi = np.array([j.pmi for j in experts])
    given = np.array([j.logp_given_question for j in experts])
    without = np.array([j.logp_without_question for j in experts])
    jury_pmi, jury_given, jury_without = float(weights @ pmi), float(weights @ given), float(weights @ without)
    evidence = {
        "jury_pmi": jury_pmi,
        "jury_logp_given": jury_given,
        "jury_logp_without": jury_without,
        "jury_pmi_spread": float(np.sqrt(weights @ (pmi - jury_pmi) ** 2)),
        "base_pmi": base.pmi,
        "base_logp_given": base.logp_given_question,
        "base_logp_without": base.logp_without_question,
        "contrast_logp_given": jury_given - base.logp_given_question,
        "contrast_pmi": jury_pmi - base.pmi,
        "contrast_logp_without": jury_without - base.logp_without_question,
        "contrast_logp_given_max": float(given.max()) - base.logp_given_question,
        "agreement": 0.0 if agreement is None else (1.0 if agreement else -1.0),
    }
    shape = {
        "log_answer_tokens": math.log1p(base.answer_tokens),
        "log_question_chars": math.log1p(len(question)),
        "long_answer": float(base.answer_tokens > 40),
    }
    values = {**evidence, **shape, **checks}
    for name, value in evidence.items():
        values[f"{name}_x_long"] = value * shape["long_answer"]
        values[f"{name}_x_log_answer_tokens"] = value * shape["log_answer_tokens"]
    return {name: values[name] for name in FEATURES}


def largest_cluster_contains_candidate(similarity: np.ndarray, threshold: float) -> bool:
    """Node 0 is the candidate; edges where similarity >= threshold; is it in the largest component?"""
    import networkx as nx

    graph = nx.Graph()
    graph.add_nodes_from(range(len(similarity)))
    rows, cols = np.nonzero(np.triu(similarity >= threshold, k=1))
    graph.add_edges_from(zip(rows.tolist(), cols.tolist()))
    components = sorted(nx.connected_components(graph), key=lambda c: (-len(c), min(c)))
    return 0 in components[0]


def select_jurors(top_k: Sequence[Any], servable: set[str], k: int) -> list[tuple[str, str | None]]:
    """The first ``k`` distinct servable experts of the router's top-k, topped up with the other
    servable experts (the router may name fewer than k), then the base model."""
    chosen: dict[str, str | None] = {}
    if k > 0:
        for candidate in top_k:
            if candidate.expert in servable and candidate.expert != BASE_EXPERT:
                chosen.setdefault(candidate.expert, candidate.domain)
        for name in sorted(servable - {BASE_EXPERT}):
            chosen.setdefault(name, None)
    return list(chosen.items())[:k] + [(BASE_EXPERT, None)]


class Jury:
    """Forms juries, gathers evidence, and returns calibrated verdicts.

    ``pool`` needs ``score(question, answer, experts)`` and ``generate(requests)``; ``router`` needs
    ``route(query)`` returning a decision with ``top_k``; ``registry`` gives active experts and
    reputations. None of them needs Ray.
    """

    def __init__(
        self,
        pool: Any,
        router: Any,
        registry: Any,
        calibrator: Calibrator | None = None,
        config: JuryConfig | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        self.pool, self.router, self.registry = pool, router, registry
        self.calibrator = calibrator
        self.config = config or JuryConfig()
        self.embedder = embedder

    @property
    def state_layer(self) -> int | None:
        """The base model's layer the calibrator's truthfulness probe reads (None: no probe)."""
        probe = self.calibrator.probe if self.calibrator is not None else None
        return probe.layer if probe is not None else None

    @property
    def adapters_read_question(self) -> bool:
        """How jurors score (:attr:`JuryConfig.adapters_read_question`, resolved)."""
        if self.config.adapters_read_question is not None:
            return self.config.adapters_read_question
        return calibrated_reading(self.calibrator) if self.calibrator is not None else False

    # ------------------------------------------------------------ forming the jury

    def select(self, question: str, k: int | None = None) -> list[tuple[str, str | None]]:
        """(expert, domain) pairs: the k most relevant active experts by the router, then the base."""
        return self.select_many([question], k)[0]

    def select_many(self, questions: Sequence[str], k: int | None = None) -> list[list[tuple[str, str | None]]]:
        """:meth:`select` for several questions, with one batched routing call."""
        k = self.config.k if k is None else k
        servable = set(self.pool.experts())
        if k > 0 and servable - {BASE_EXPERT}:
            return [select_jurors(d.top_k, servable, k) for d in self.router.route_batch(list(questions))]
        return [select_jurors([], servable, k) for _ in questions]

    def weight(self, expert: str) -> float:
        reputation = self.registry.reputation(expert, prior=self.config.reputation_prior)
        return reliability_weight(reputation, self.config.reputation_sharpness)

    # ------------------------------------------------------------ evidence

    def evidence(self, question: str, answer: str, jurors: Sequence[tuple[str, str | None]]) -> list[JurorEvidence]:
        return self.evidence_many([(question, answer, jurors)])[0]

    def evidence_many(
        self, items: Sequence[tuple[str, str, Sequence[tuple[str, str | None]]]], state_layer: int | None = None
    ) -> list[list[JurorEvidence]]:
        """Evidence for several (question, answer, jurors) items, scored in shared passes, with
        the base model's answer state at ``state_layer`` (default: the layer the probe reads)."""
        scores = self.pool.score_many(
            [(q, a, [name for name, _ in jurors]) for q, a, jurors in items],
            self.adapters_read_question,
            self.state_layer if state_layer is None else state_layer,
        )
        return [self.weigh(jurors, item_scores) for (_, _, jurors), item_scores in zip(items, scores)]

    def weigh(self, jurors: Sequence[tuple[str, str | None]], scores: Sequence[ExpertScore]) -> list[JurorEvidence]:
        """Scores (same order as ``jurors``) -> evidence with reputation weights."""
        return [
            JurorEvidence(
                expert=s.expert,
                domain=domain,
                weight=self.weight(s.expert),
                logp_given_question=s.logp_given_question,
                logp_without_question=s.logp_without_question,
                pmi=s.pmi,
                answer_tokens=s.answer_tokens,
                answer_state=s.answer_state,
            )
            for s, (_, domain) in zip(scores, jurors)
        ]

    def cast_votes(
        self, question: str, jurors: Sequence[JurorEvidence], checks: dict[str, float], agreement: bool | None
    ) -> None:
        """Each expert's vote: does its evidence, beside the base model's, make the calibrator's
        P(correct) higher than the base model's evidence alone does? So a vote is the juror's
        own contribution; what every juror shares (the answer's length, the base model) moves
        both sides alike and cancels. An expert that changes nothing sides with the reference;
        the base model votes P(correct) > 0.5. Feedback credits the jurors whose vote matched
        the truth. Without a calibrator: PMI > 0. With a truthfulness probe, the experts' votes
        are read by the calibrator's probe-less ``voter``, fitted on the same rows."""
        base = next(j for j in jurors if j.expert == BASE_EXPERT)
        if self.calibrator is None:
            for juror in jurors:
                juror.vote = juror.pmi > 0
            return
        voter = self.calibrator.voter or self.calibrator  # without the probe every juror shares
        base_values = self.evidence_values([base], question, checks, agreement)
        reference = self.probability(base_values, voter)
        for juror in jurors:
            if juror is base:
                juror.vote = self.probability(base_values) > 0.5  # the probe is the base model's own
                continue
            alone = self.probability(
                self.evidence_values([juror.model_copy(update={"weight": 1.0}), base], question, checks, agreement),
                voter,
            )
            juror.vote = alone > reference if alone != reference else reference > 0.5

    def own_answers(self, question: str, answer: str, jurors: list[JurorEvidence]) -> bool:
        """Jurors answer too; True when the candidate sits in the largest agreement cluster."""
        if self.embedder is None:
            raise MoseError("own answers need a sentence embedder (MiniLM); none is configured")
        texts = [r.text for r in self.pool.generate(self.own_answer_requests(question, jurors))]
        return self.agreement(jurors, texts, np.asarray(self.embedder([answer] + texts)))

    def own_answer_requests(self, question: str, jurors: Sequence[JurorEvidence]) -> list[GenerationRequest]:
        """One short greedy answer to ``question`` per juror."""
        params = SamplingParams(max_new_tokens=self.config.own_answer_tokens, temperature=0.0)
        return [
            GenerationRequest(expert=j.expert, messages=[ChatMessage(role="user", content=question)], params=params)
            for j in jurors
        ]

    def agreement(self, jurors: Sequence[JurorEvidence], texts: Sequence[str], vectors: np.ndarray) -> bool:
        """Record each juror's answer and its similarity to the candidate (``vectors[0]``); True
        when the candidate sits in the largest cluster of the agreement graph."""
        similarity = vectors @ vectors.T
        for juror, text, sim in zip(jurors, texts, similarity[0, 1:]):
            juror.own_answer, juror.similarity = text, float(sim)
        return largest_cluster_contains_candidate(similarity, self.config.similarity_threshold)

    # ------------------------------------------------------------ verdicts

    def crosscheck(self, question: str, answer: str, k: int | None = None, own_answers: bool = False) -> Verdict:
        """The jury's calibrated verdict on ``answer``."""
        question, answer = self.prepare(question, answer)
        if not answer.strip():
            return self.empty_answer_verdict(question, answer)
        jurors = self.evidence(question, answer, self.select(question, k))
        agreement = self.own_answers(question, answer, jurors) if own_answers else None
        return self.verdict(question, answer, jurors, agreement)

    def prepare(self, question: str, answer: str) -> tuple[str, str]:
        """Validate the question; cut an over-long answer."""
        if not isinstance(answer, str):
            raise MoseError("the answer must be a string")
        return _check_text(question, "question"), answer[: self.config.max_answer_chars]

    def empty_answer_verdict(self, question: str, answer: str) -> Verdict:
        """An empty answer is wrong by definition: say so without scoring anything."""
        return Verdict(
            id=new_verdict_id(question, answer),
            p_correct=0.0,
            flagged=True,
            threshold=self._threshold(),
            jurors=[],
            calibrator=self.calibrator_version,
            evidence={"empty_answer": 1.0},
        )

    def verdict(self, question: str, answer: str, jurors: list[JurorEvidence], agreement: bool | None) -> Verdict:
        """Aggregate the jurors' evidence and the answer's text checks into a calibrated verdict."""
        checks = text_checks(question, answer)
        values = self.evidence_values(jurors, question, checks, agreement)
        p_correct = self.probability(values)
        self.cast_votes(question, jurors, checks, agreement)
        return Verdict(
            id=new_verdict_id(question, answer),
            p_correct=p_correct,
            flagged=p_correct < self._threshold(),
            threshold=self._threshold(),
            jurors=jurors,
            agreement=agreement,
            calibrator=self.calibrator_version,
            evidence=values,
        )

    def evidence_values(
        self, jurors: Sequence[JurorEvidence], question: str, checks: dict[str, float], agreement: bool | None
    ) -> dict[str, float]:
        """:func:`features`, plus the truthfulness probe's logit when the calibrator has a probe."""
        values = features(jurors, question, checks, agreement)
        probe = self.calibrator.probe if self.calibrator is not None else None
        if probe is not None:
            state = next(j.answer_state for j in jurors if j.expert == BASE_EXPERT)
            if state is None:
                raise ServerError(
                    f"calibrator {self.calibrator.version} reads the base model's answer state at "
                    f"layer {probe.layer}, and the evidence has none: score with state_layer={probe.layer}"
                )
            values[PROBE_FEATURE] = float(probe.logits(np.asarray(state))[0])
        return values

    def probability(self, values: dict[str, float], model: Calibrator | None = None) -> float:
        """Calibrated P(correct) (by ``model``, default the calibrator); without a calibrator, a
        logistic squash of the jury PMI."""
        if self.calibrator is None:
            return float(1.0 / (1.0 + math.exp(-values["jury_pmi"])))
        model = model or self.calibrator
        fitted_with = calibrated_reading(self.calibrator)
        if fitted_with != self.adapters_read_question:
            raise ServerError(
                f"calibrator {self.calibrator.version} was fitted on evidence with "
                f"adapters_read_question={fitted_with}, but this jury scores "
                f"with {self.adapters_read_question}: drop the setting or train a calibrator with it"
            )
        return float(model.predict(np.array([[values[f] for f in model.features]]))[0])

    def _threshold(self) -> float:
        return self.calibrator.threshold if self.calibrator is not None else 0.5

    @property
    def calibrator_version(self) -> str | None:
        """Version of the calibrator in use (None: uncalibrated)."""
        return self.calibrator.version if self.calibrator is not None else None

    # ------------------------------------------------------------ feedback

    def record(self, verdict: Verdict) -> Verdict:
        """Store the verdict so feedback can reach its jurors later."""
        self.registry.record_verdict(verdict.id, verdict.model_dump(mode="json"))
        return verdict

    def feedback(self, verdict_id: str, correct: bool, actor: str = "feedback") -> dict[str, float]:
        """Credit each juror whose vote matched the truth, debit the others; returns new weights.

        Feedback counts once per verdict (a repeat is a ConflictError) and is audit-logged.
        """
        payload, _ = self.registry.verdict(verdict_id)
        verdict = Verdict.model_validate(payload)
        updates = {
            j.expert: (float(j.vote == correct), float(j.vote != correct)) for j in verdict.jurors if j.vote is not None
        }
        reputations = self.registry.record_feedback(
            verdict_id, correct, updates, actor, prior=self.config.reputation_prior
        )
        return {name: reliability_weight(r, self.config.reputation_sharpness) for name, r in reputations.items()}


def calibrated_reading(calibrator: Calibrator) -> bool:
    """Whether the jurors' adapters read the question in the evidence ``calibrator`` was fitted on
    (calibrators from before the setting existed: they did)."""
    return bool(calibrator.trained_on.get("adapters_read_question", True))


def new_verdict_id(question: str, answer: str) -> str:
    digest = hashlib.sha256(f"{question}\x00{answer}".encode()).hexdigest()[:8]
    return f"vrd-{digest}-{uuid.uuid4().hex[:12]}"


def _check_text(text: str, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise MoseError(f"the {what} must be a non-empty string")
    return text
