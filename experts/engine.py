"""The engine loop: one thread per pool owns the model and decodes every request in step-level batches.

A small version of vLLM's engine core. Work arrives on one queue: generation rows (streamed or
not) and jobs (scoring, run between steps). Each iteration the loop

1. runs the jobs that wait,
2. admits waiting rows up to ``max_batch`` per model: one prefill pass for the newcomers, whose
   KV cache is then merged into the running batch's (both left-padded to a common width),
3. drops rows whose consumer went away (cancelled) or whose expert was unloaded,
4. runs ONE decode step for all running rows of each model, hands each row its token (a streamed
   row's new text goes to its handle at once) and retires finished rows with their reason.

So a request never waits for another to finish: it joins the batch at the next step and leaves it
when it is done, streamed or not; a client that goes away stops costing steps at the next one.
The pool's lock is held for one iteration at a time, not for a whole generation, so adding or
removing an expert waits for one step at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from experts.chat import forward_kwargs, left_pad
from experts.decoding import RowState, advance, as_entries, new_row, ready_text, result_logprobs, score_prompt
from experts.types import GenerationRequest, GenerationResult
from registry.errors import MoseError

logger = logging.getLogger("mose.engine")

IDLE_POLL_S = 1.0
"""How often an idle loop checks that its pool still exists (the thread ends once it is gone)."""


class RowCancelled(MoseError):
    """The row was cancelled before it finished (its consumer went away)."""


@dataclass(frozen=True)
class Admission:
    """Where and how one request decodes, resolved by the pool when the loop admits its row."""

    group: str
    """Model group: "" for the shared base (its LoRA experts and the base itself), else a full expert's name."""
    key: str
    """The row's adapter key on the shared base (``__base__`` for none); a full expert's name."""
    prompt: list[int]
    """Prompt token ids (chat template applied, cut from the left to the pool's limit)."""
    model: Any
    """The model of a full expert, held by its batch until the batch empties (None for the shared base,
    whose model object changes when its first adapter is added or its last one removed)."""
    tokenizer: Any
    eos_ids: frozenset[int]
    pad_id: int


class EngineHost(Protocol):
    """What the loop needs from the pool that owns it (:class:`experts.pool.ExpertPool`)."""

    _lock: Any
    """Held for one loop iteration; whoever changes the pool's models takes it too."""

    def _admit(self, request: GenerationRequest) -> Admission:
        """Resolve and tokenize a request (may load a full expert); MoseError if it cannot be served."""

    def _forward_setup(self, group: str, held_model: Any, keys: Sequence[str]) -> tuple[Any, Any, list[str] | None]:
        """(model, context, adapter_names) for one forward pass over rows with these adapter keys."""

    def _serves(self, admission: Admission) -> bool:
        """The admitted row's expert is still loaded (an unloaded adapter cannot decode on)."""


@dataclass(frozen=True)
class StepRecord:
    """One decoding step of one model, as the loop's optional observer sees it (tests, diagnostics)."""

    step: int
    """The loop's step counter (every model's steps count)."""
    group: str
    """Model group ("" for the shared base)."""
    rows: tuple[int, ...]
    """Ids of the rows decoded in this step's forward pass."""
    streamed: tuple[int, ...]
    """Which of them stream their text."""
    admitted: tuple[int, ...]
    """Rows prefilled just before this step (they got their first token there)."""


@dataclass(frozen=True)
class _End:
    outcome: Any  # GenerationResult or the exception that ended the row


_PENDING = object()


class RowHandle:
    """One request in the engine loop: its text pieces as they are decoded (when streamed), its
    result, and its cancel switch.

    Iterate it (``for`` or ``async for``) for the pieces; leaving the iteration before the end
    (break, an error, a closed or cancelled async generator) cancels the row, and the loop drops it
    at its next step. :meth:`result` and :meth:`wait` give the :class:`GenerationResult`.
    """

    def __init__(self, row_id: int, streamed: bool) -> None:
        self.id = row_id
        self.streamed = streamed
        self.batch_size = 0
        """Most rows decoded in one forward pass together with this one (itself included)."""
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._outcome: Any = _PENDING
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._wakers_lock = threading.Lock()

    # ------------------------------------------------------------ the loop's side

    def _push(self, item: Any) -> None:
        self._items.put(item)
        with self._wakers_lock:
            wakers = list(self._wakers)
        for loop, event in wakers:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop is closed: its consumer is gone
                pass

    def _finish(self, outcome: Any) -> None:
        self._push(_End(outcome))

    # ------------------------------------------------------------ the consumer's side

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        """The consumer has seen the row's end (its result or error)."""
        return self._outcome is not _PENDING

    def cancel(self) -> None:
        """Stop decoding this row at the loop's next step (nothing happens once it finished)."""
        self._cancelled.set()

    def _take(self, item: Any) -> str | None:
        if isinstance(item, _End):
            self._outcome = item.outcome
            return None
        return item

    def _result(self) -> GenerationResult:
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome

    def __iter__(self) -> Iterator[str]:
        try:
            while not self.done:
                piece = self._take(self._items.get())
                if piece is not None:
                    yield piece
            self._result()  # the row's error, if it failed
        finally:
            if not self.done:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        waker = (loop, event)
        with self._wakers_lock:
            self._wakers.append(waker)
        try:
            while not self.done:
                try:
                    item = self._items.get_nowait()
                except queue.Empty:
                    event.clear()
                    if self._items.empty():  # checked after clear(): a push in between sets it again
                        await event.wait()
                    continue
                piece = self._take(item)
                if piece is not None:
                    yield piece
            self._result()
        finally:
            with self._wakers_lock:
                self._wakers.remove(waker)
            if not self.done:
                self.cancel()

    def result(self) -> GenerationResult:
        """Block until the row is done; its pieces, if streamed and not read, are dropped."""
        while not self.done:
            self._take(self._items.get())
        return self._result()

    async def wait(self) -> GenerationResult:
        """:meth:`result` without blocking the event loop; cancelling the waiting task cancels the row."""
        async for _ in self:
            pass
        return self._result()


@dataclass
class _Row:
    handle: RowHandle
    request: GenerationRequest
    admission: Admission | None = None
    state: RowState | None = None
    sent: str = ""  # text already pushed to a streamed row's handle


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple
    future: Future = field(default_factory=Future)


_STOP = object()


def _plain(cache: Any) -> bool:
    """A cache of plain growing layers, whose rows can be padded, merged and trimmed."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _layers(cache: Any) -> list[tuple[Any, Any]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache(layers: Sequence[tuple[Any, Any]]) -> Any:
    from transformers.cache_utils import DynamicCache

    return DynamicCache(list(layers))


def _pad_left(tensor: Any, width: int, dim: int) -> Any:
    """``tensor`` with zeros prepended along ``dim`` (-1 or -2) up to ``width``."""
    import torch.nn.functional as F

    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    return F.pad(tensor, (missing, 0) if dim == -1 else (0, 0, missing, 0))


class _Batch:
    """The running rows of one model: KV cache, attention mask, next input token and position, one
    row each, in the same order (sorted by adapter key, so each adapter's rows are one slice)."""

    def __init__(self, first: Admission) -> None:
        self.group, self.model = first.group, first.model
        self.tokenizer, self.eos_ids, self.pad_id = first.tokenizer, set(first.eos_ids), first.pad_id
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: Any = None  # [rows, cached tokens]
        self.next_ids: Any = None  # [rows, 1]: each row's last token, fed at the next step
        self.positions: Any = None  # [rows, 1]: its position

    @property
    def keys(self) -> list[str]:
        return [row.admission.key for row in self.rows]

    @property
    def accepts_rows(self) -> bool:
        """New rows can join between steps (sliding-window or other caches: only an empty batch)."""
        return not self.rows or _plain(self.cache)

    def join(self, rows: list[_Row], cache: Any, mask: Any, next_ids: Any, positions: Any) -> None:
        """Add prefilled rows: both caches left-padded to the wider one, then stacked."""
        import torch

        if not self.rows:
            self.rows, self.cache, self.mask, self.next_ids, self.positions = rows, cache, mask, next_ids, positions
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.cache = _cache(
            [
                (
                    torch.cat([_pad_left(k0, width, -2), _pad_left(k1, width, -2)]),
                    torch.cat([_pad_left(v0, width, -2), _pad_left(v1, width, -2)]),
                )
                for (k0, v0), (k1, v1) in zip(_layers(self.cache), _layers(cache))
            ]
        )
        self.mask = torch.cat([_pad_left(self.mask, width, -1), _pad_left(mask, width, -1)])
        self.next_ids = torch.cat([self.next_ids, next_ids])
        self.positions = torch.cat([self.positions, positions])
        self.rows = self.rows + rows
        order = sorted(range(len(self.rows)), key=lambda i: self.rows[i].admission.key)
        if order != list(range(len(self.rows))):
            self._take(order)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order); the left padding no remaining row needs goes."""
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.rows, self.cache, self.mask, self.next_ids, self.positions = [], None, None, None, None
            return
        self._take(indices)
        self._trim()

    def _take(self, indices: list[int]) -> None:
        import torch

        index = torch.tensor(indices, device=self.mask.device)
        self.rows = [self.rows[i] for i in indices]
        self.cache.batch_select_indices(index)
        self.mask, self.next_ids, self.positions = self.mask[index], self.next_ids[index], self.positions[index]

    def _trim(self) -> None:
        if not _plain(self.cache):
            return
        first = int(self.mask.any(dim=0).int().argmax())  # the first column any row attends to
        if first > 0:
            self.cache = _cache([(k[:, :, first:], v[:, :, first:]) for k, v in _layers(self.cache)])
            self.mask = self.mask[:, first:]


class EngineLoop:
    """One daemon thread that owns a pool's model and decodes all its requests in shared steps.

    ``max_batch``: most rows decoded together per model (more wait for a slot). ``batch_wait_s``:
    how long an idle loop waits after a first request for others to share its prefill pass (rows
    that arrive while a batch runs join it at the next step without waiting). ``observer``: called
    on the loop's thread with a :class:`StepRecord` after each decoding step (tests use it).

    The loop holds its pool weakly: it starts at the first request and ends once the pool is gone.
    """

    def __init__(self, host: EngineHost, max_batch: int, batch_wait_s: float = 0.0) -> None:
        self._host = weakref.ref(host)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.observer: Callable[[StepRecord], None] | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[_Row] = deque()
        self._jobs: deque[_Job] = deque()
        self._batches: dict[str, _Batch] = {}
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._steps = 0
        self._tokens = 0
        self._finished = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}

    # ------------------------------------------------------------ submitting work

    def submit(self, request: GenerationRequest, streamed: bool = False) -> RowHandle:
        """Queue one (already validated) request; it joins the running batch at the next step."""
        handle = RowHandle(next(self._ids), streamed)
        self._put(_Row(handle, request))
        return handle

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the loop's thread between two steps (under the pool's lock) and return
        its result. Never call it while holding that lock: the loop would wait for it forever."""
        if threading.current_thread() is self._thread:
            host = self._host()
            with host._lock if host is not None else contextlib.nullcontext():
                return fn(*args)
        job = _Job(fn, args)
        self._put(job)
        return job.future.result()

    def close(self) -> None:
        """Stop the loop: waiting and running rows fail, the thread ends."""
        with self._start_lock:
            self._closed = True
            if self._thread is not None and self._thread.is_alive():
                self._queue.put(_STOP)

    def stats(self) -> dict[str, Any]:
        """Steps, tokens and finished rows by reason so far; rows running and waiting now."""
        return {
            "steps": self._steps,
            "tokens": self._tokens,
            "finished": dict(self._finished),
            "running": sum(len(b.rows) for b in list(self._batches.values())),
            "waiting": len(self._waiting) + self._queue.qsize(),
        }

    def _put(self, item: Any) -> None:
        with self._start_lock:
            if self._closed:
                raise MoseError("the expert pool is closed")
            self._queue.put(item)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mose-engine", daemon=True)
                self._thread.start()

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        while self._collect():
            host = self._host()
            if host is None:
                break
            try:
                records = self._iteration(host)
            except Exception as exc:  # a bug or a failed device: nobody may wait forever
                logger.exception("engine iteration failed")
                self._fail_all(exc)
                records = []
            del host
            for record in records:
                self._observe(record)
        self._fail_all(MoseError("the expert pool was closed"))

    def _idle(self) -> bool:
        return not (self._batches or self._waiting or self._jobs)

    def _collect(self) -> bool:
        """Take new work from the queue; when idle, wait for some. False: stop the loop."""
        if self._idle():
            while True:
                try:
                    item = self._queue.get(timeout=IDLE_POLL_S)
                    break
                except queue.Empty:
                    if self._host() is None:
                        return False
            if not self._accept(item):
                return False
            deadline = time.monotonic() + self.batch_wait_s
            while self._waiting and not self._jobs and len(self._waiting) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    if left <= 0 or not self._accept(self._queue.get(timeout=left)):
                        break
                except queue.Empty:
                    break
        while True:
            try:
                if not self._accept(self._queue.get_nowait()):
                    return False
            except queue.Empty:
                return True

    def _accept(self, item: Any) -> bool:
        if item is _STOP:
            return False
        (self._jobs if isinstance(item, _Job) else self._waiting).append(item)
        return True

    def _iteration(self, host: EngineHost) -> list[StepRecord]:
        import torch

        records = []
        with host._lock:
            while self._jobs:
                self._run_job(self._jobs.popleft())
            with torch.inference_mode():
                admitted = self._admit(host)
                for group in list(self._batches):
                    record = self._step(host, self._batches[group], admitted.get(group, ()))
                    if record is not None:
                        records.append(record)
                    if not self._batches[group].rows:
                        del self._batches[group]
        return records

    def _run_job(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn(*job.args))
        except BaseException as exc:  # delivered to the caller
            job.future.set_exception(exc)

    def _observe(self, record: StepRecord) -> None:
        observer = self.observer
        if observer is None:
            return
        try:
            observer(record)
        except Exception:
            logger.exception("engine step observer failed")

    # ------------------------------------------------------------ admission and prefill

    def _admit(self, host: EngineHost) -> dict[str, tuple[int, ...]]:
        """Prefill waiting rows that fit their model's batch; returns the admitted row ids by group."""
        newcomers: dict[str, list[_Row]] = {}
        waiting: deque[_Row] = deque()
        while self._waiting:
            row = self._waiting.popleft()
            if row.handle.cancelled:
                self._cancel(row)
                continue
            if row.admission is None:
                try:
                    row.admission = host._admit(row.request)
                except Exception as exc:
                    self._fail(row, exc)
                    continue
            group = row.admission.group
            batch = self._batches.get(group)
            running = len(batch.rows) if batch is not None else 0
            full = running + len(newcomers.get(group, ())) >= self.max_batch
            if full or (batch is not None and not batch.accepts_rows):
                waiting.append(row)  # keeps its place in the queue
                continue
            newcomers.setdefault(group, []).append(row)
        self._waiting = waiting
        for group, rows in newcomers.items():
            self._prefill(host, group, rows)
        return {group: tuple(row.handle.id for row in rows) for group, rows in newcomers.items()}

    def _prefill(self, host: EngineHost, group: str, rows: list[_Row]) -> None:
        """One forward pass over the newcomers' prompts; each samples its first token, and those
        not done join the running batch."""
        import torch

        rows.sort(key=lambda row: row.admission.key)
        batch = self._batches.setdefault(group, _Batch(rows[0].admission))
        try:
            model, context, names = host._forward_setup(group, batch.model, [row.admission.key for row in rows])
            device = next(model.parameters()).device
            ids, mask, positions = (
                t.to(device) for t in left_pad([row.admission.prompt for row in rows], batch.pad_id)
            )
            scored = any(row.request.params.prompt_logprobs is not None for row in rows)
            with context:
                out = model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    logits_to_keep=0 if scored else 1,
                    **forward_kwargs(names),
                )
        except Exception as exc:
            logger.exception("prefill failed")
            for row in rows:
                self._fail(row, exc)
            return
        logits = out.logits[:, -1, :]
        tokens = []
        for i, row in enumerate(rows):
            row.state = new_row(row.request.params, row.admission.prompt, row.request.question)
            if row.request.params.prompt_logprobs is not None:  # the prompt's own positions of this pass
                row.state.prompt_logprobs = score_prompt(
                    out.logits[i], row.admission.prompt, row.request.params.prompt_logprobs
                )
            row.handle.batch_size = max(row.handle.batch_size, len(rows))
            tokens.append(self._advance(batch, row, logits[i]))
        keep = [i for i, row in enumerate(rows) if not row.state.done]
        if not keep:
            return
        part = _Batch(rows[0].admission)
        part.rows, part.cache, part.mask = rows, out.past_key_values, mask
        part.next_ids = torch.tensor(tokens, device=device).unsqueeze(1)
        part.positions = positions[:, -1:] + 1
        part.keep(keep)
        batch.join(part.rows, part.cache, part.mask, part.next_ids, part.positions)

    # ------------------------------------------------------------ decoding

    def _step(self, host: EngineHost, batch: _Batch, admitted: tuple[int, ...]) -> StepRecord | None:
        """One decoding step for every running row of ``batch``."""
        import torch

        keep = []
        for i, row in enumerate(batch.rows):
            if row.handle.cancelled:
                self._cancel(row)
            elif not host._serves(row.admission):
                self._fail(row, MoseError(f"expert {row.request.expert!r} was unloaded while it was generating"))
            else:
                keep.append(i)
        batch.keep(keep)
        if not batch.rows:
            return None
        mask = torch.cat([batch.mask, torch.ones_like(batch.next_ids)], dim=1)
        try:
            model, context, names = host._forward_setup(batch.group, batch.model, batch.keys)
            with context:
                out = model(
                    input_ids=batch.next_ids,
                    attention_mask=mask,
                    position_ids=batch.positions,
                    past_key_values=batch.cache,
                    use_cache=True,
                    logits_to_keep=1,
                    **forward_kwargs(names),
                )
        except Exception as exc:
            logger.exception("decoding step failed")
            for row in batch.rows:
                self._fail(row, exc)
            batch.keep([])
            return None
        batch.cache, batch.mask = out.past_key_values, mask
        logits = out.logits[:, -1, :]
        self._steps += 1
        record = StepRecord(
            step=self._steps,
            group=batch.group,
            rows=tuple(row.handle.id for row in batch.rows),
            streamed=tuple(row.handle.id for row in batch.rows if row.handle.streamed),
            admitted=admitted,
        )
        tokens = []
        for i, row in enumerate(batch.rows):
            row.handle.batch_size = max(row.handle.batch_size, len(batch.rows))
            tokens.append(self._advance(batch, row, logits[i]))
        batch.next_ids = torch.tensor(tokens, device=batch.next_ids.device).unsqueeze(1)
        batch.positions = batch.positions + 1
        batch.keep([i for i, row in enumerate(batch.rows) if not row.state.done])
        return record

    def _advance(self, batch: _Batch, row: _Row, logits: Any) -> int:
        """Sample the row's next token; push its new text when streamed; finish it when done."""
        token = advance(row.state, logits, batch.tokenizer, batch.eos_ids)
        self._tokens += 1
        if row.handle.streamed:
            ready = ready_text(row.state)
            if len(ready) > len(row.sent) and ready.startswith(row.sent):
                row.handle._push(ready[len(row.sent) :])
                row.sent = ready
        if row.state.done:
            self._finished[row.state.finish_reason] += 1
            row.handle._finish(
                GenerationResult(
                    expert=row.request.expert,
                    text=row.state.text,
                    finish_reason=row.state.finish_reason,
                    prompt_tokens=len(row.admission.prompt),
                    completion_tokens=len(row.state.token_ids),
                    logprobs=result_logprobs(row.state, batch.tokenizer),
                    prompt_logprobs=None
                    if row.state.prompt_logprobs is None
                    else as_entries(row.state.prompt_logprobs, batch.tokenizer),
                )
            )
        return token

    # ------------------------------------------------------------ ending rows

    def _cancel(self, row: _Row) -> None:
        self._finished["cancelled"] += 1
        row.handle._finish(RowCancelled(f"request {row.handle.id} was cancelled"))

    def _fail(self, row: _Row, exc: BaseException) -> None:
        self._finished["error"] += 1
        row.handle._finish(exc)

    def _fail_all(self, exc: BaseException) -> None:
        """End everything in the loop with ``exc`` (rows and jobs); the loop starts afresh."""
        for batch in self._batches.values():
            for row in batch.rows:
                self._fail(row, exc)
        self._batches.clear()
        while self._waiting:
            self._fail(self._waiting.popleft(), exc)
        while self._jobs:
            job = self._jobs.popleft()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc)


__all__ = ["Admission", "EngineHost", "EngineLoop", "RowCancelled", "RowHandle", "StepRecord"]
