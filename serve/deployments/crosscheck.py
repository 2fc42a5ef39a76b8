"""The cross-check jury's deployment; it borrows the router and the pool through handles."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from registry.errors import MoseError, UnavailableError
from registry.home import MoseHome
from serve.deployments._common import REGISTRY_REFRESH_S, logger, open_registry


class CrossCheckDeployment:
    """The jury: asks the router for jurors and the expert pool for evidence, then calibrates.

    Holds no model of its own (the pool's base model is shared); the calibrator is reloaded when
    a new version is trained. While ``mose up`` fits the first calibrator beside the running
    server, verdicts are refused with a 503 rather than given uncalibrated.
    """

    def __init__(self, home_root: str, router: Any, pool: Any) -> None:
        from jury.jury import Jury
        from router_model.embedder import MiniLMEmbedder

        self.home = MoseHome.from_env(home_root)
        self.registry = open_registry(home_root)
        self.router, self.pool = router, pool
        # MiniLM loads on the first verdict with own answers
        self.jury = Jury(None, None, self.registry, self._load_calibrator(), embedder=MiniLMEmbedder())
        self._checked_at = time.monotonic()

    def _load_calibrator(self):
        from jury.calibrator import load_calibrator

        try:
            return load_calibrator(self.home.crosscheck_dir)
        except MoseError as exc:
            logger.warning("no calibrator, verdicts are uncalibrated: %s", exc)
            return None

    def _maybe_reload(self) -> None:
        if time.monotonic() - self._checked_at > REGISTRY_REFRESH_S:
            self._checked_at = time.monotonic()
            current = self._load_calibrator() if (self.home.crosscheck_dir / "current").is_file() else None
            if current is not None and current.version != self.jury.calibrator_version:
                self.jury.calibrator = current

    async def crosscheck(self, question: str, answer: str, k: int | None = None, own_answers: bool = False):
        from jury.jury import select_jurors

        self._maybe_reload()
        self._refuse_while_fitting()
        jury = self.jury
        question, answer = jury.prepare(question, answer)
        if not answer.strip():
            return jury.record(jury.empty_answer_verdict(question, answer))
        k = jury.config.k if k is None else k
        servable = set(await self.pool.experts.remote())
        top_k = (await self.router.route.remote(question)).top_k if k > 0 and len(servable) > 1 else []
        jurors_wanted = select_jurors(top_k, servable, k)
        scores = await self.pool.score.remote(
            question, answer, [name for name, _ in jurors_wanted], jury.adapters_read_question, jury.state_layer
        )
        jurors = await asyncio.to_thread(jury.weigh, jurors_wanted, scores)
        agreement = await self._agreement(question, answer, jurors) if own_answers else None
        return await asyncio.to_thread(lambda: jury.record(jury.verdict(question, answer, jurors, agreement)))

    async def _agreement(self, question: str, answer: str, jurors: list[Any]) -> bool:
        requests = self.jury.own_answer_requests(question, jurors)
        results = await asyncio.gather(*(self.pool.generate.remote(r) for r in requests))
        texts = [result.text for result, _ in results]
        vectors = await asyncio.to_thread(self.jury.embedder, [answer] + texts)
        return self.jury.agreement(jurors, texts, vectors)

    def feedback(self, verdict_id: str, correct: bool, actor: str) -> dict[str, float]:
        return self.jury.feedback(verdict_id, correct, actor=actor)

    def _refuse_while_fitting(self) -> None:
        from jury.calibrator import fitting_in_progress

        if self.jury.calibrator is not None:
            return
        fitting = fitting_in_progress(self.home.crosscheck_dir)
        if fitting is not None:
            raise UnavailableError(
                f"the cross-check calibrator is being fitted (started {time.time() - fitting.since:.0f} s ago; "
                "3 to 8 minutes on 2 CPU cores): retry when /healthz reports a calibrator"
            )

    def status(self) -> dict[str, Any]:
        from jury.calibrator import fitting_in_progress

        self._maybe_reload()
        fitting = None if self.jury.calibrator is not None else fitting_in_progress(self.home.crosscheck_dir)
        return {"calibrator": self.jury.calibrator_version, "calibrator_fitting": fitting is not None}
