"""The decode engine: a bounded request queue and one background thread that decodes many requests together.

Every request becomes `n` rows. A row is laid out [pads, user prefix, prompt] (left padding, as
`PersonalizedPolicy.generate` lays it out): its own user's soft prompt, its own sampling parameters and random
generator, its own stop strings and token budget. The loop, one step at a time:

1. admit: waiting requests join while the batch has room (`max_batch` rows). They are prefilled together (one
   forward of their inputs_embeds, with position ids that count only real positions) and their KV cache is
   merged into the running batch's (`serving.kv_cache`): continuous batching, a request never waits for the
   batch before it to finish;
2. decode: one forward of every row's last token against the KV cache, one next token per row
   (`serving.sampling`);
3. retire: rows that produced EOS, hit a stop string or their max_tokens, and rows of cancelled requests, leave
   the batch, and the cache loses their rows (and columns no remaining row needs).

Results go to each request's `sink` (a callable run on the engine thread; `serving.app` wraps an asyncio queue
with `call_soon_threadsafe`). A sink that raises cancels its request only. The engine thread is the only one that
touches the model; `submit` and `cancel` are thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from serving import kv_cache
from serving.policy import ResolvedUser, ServedPolicy, UserTable
from serving.sampling import RowSampler, SamplingParams, choose_tokens
from serving.text import IncrementalText

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The engine's waiting queue is full (the server answers 429)."""


class EngineStopped(RuntimeError):
    """The engine no longer accepts requests."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    user_id: str | None = None
    user_text: str | None = None
    n: int = 1


# ------------------------------------------------------------------------------------------------------- events


@dataclass
class Admitted:
    """The request's rows were prefilled; says which user row serves it."""

    user: ResolvedUser
    prompt_tokens: int


@dataclass
class TextDelta:
    index: int  # choice
    text: str


@dataclass
class SequenceDone:
    index: int
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens)
    text: str  # the whole answer
    token_ids: list[int]  # new tokens, EOS included when the answer ended with it

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class RequestDone:
    """Last event of a request; `error` is set when the engine failed it (not the client's fault)."""

    error: str | None = None


Event = Admitted | TextDelta | SequenceDone | RequestDone


# ------------------------------------------------------------------------------------------------------- state


class RequestHandle:
    """What `submit` returns: `cancel()` frees the request's slot (waiting or decoding) at the next step."""

    def __init__(self, engine: "Engine", state: "_Request"):
        self._engine, self._state = engine, state

    def cancel(self) -> None:
        self._engine.cancel(self._state)

    @property
    def done(self) -> bool:
        return self._state.done


@dataclass
class _Request:
    request: GenerationRequest
    sink: Callable[[Event], None]
    text_ids: list[int]
    cancelled: bool = False
    done: bool = False
    remaining: int = 0
    submitted: float = field(default_factory=time.monotonic)

    def emit(self, event: Event) -> None:
        if self.cancelled:
            return
        try:
            self.sink(event)
        except Exception:  # noqa: BLE001 - a client that went away must not stop the engine
            log.debug("sink failed; cancelling its request", exc_info=True)
            self.cancelled = True


@dataclass
class _Row:
    req: _Request
    index: int
    sampler: RowSampler
    text: IncrementalText
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False


@dataclass
class _Batch:
    rows: list[_Row]
    cache: object  # transformers DynamicCache, one row per _Row
    mask: torch.Tensor  # [B, L] attention mask of the cache (+ nothing for the next token yet)
    next_pos: torch.Tensor  # [B] position id of each row's next token (= its real positions so far)
    last: torch.Tensor  # [B] the token each row feeds next
    mergeable: bool  # rows can join mid-flight (full-attention DynamicCache)


# ------------------------------------------------------------------------------------------------------- engine


def validate_request(model: ServedPolicy, max_batch: int, request: GenerationRequest) -> list[int]:
    """Checks that do not depend on the engine's state (a ValueError is the client's 400); returns the user text's
    token ids. Shared by both backends."""
    if not request.prompt_ids:
        raise ValueError("the prompt is empty")
    if not 1 <= request.n <= max_batch:
        raise ValueError(f"n must be between 1 and {max_batch} (the server's --max-batch)")
    text_ids = model.text_ids(request.user_text)
    if model.max_positions is not None:
        need = model.prefix_tokens + len(text_ids) + len(request.prompt_ids) + request.params.max_tokens
        if need > model.max_positions:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + user prefix + max_tokens "
                             f"({request.params.max_tokens}) = {need} positions, more than the model's "
                             f"{model.max_positions}")
    return text_ids


class Engine:
    def __init__(self, model: ServedPolicy, max_batch: int = 16, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: deque[_Request] = deque()
        self._cv = threading.Condition()
        self._batch: _Batch | None = None
        self._thread: threading.Thread | None = None
        self._prefilling: list[_Request] = []  # admitted, not yet in the batch (failed with it on an error)
        self._stopping = False
        self.stats = {"steps": 0, "prefills": 0, "tokens": 0, "requests": 0}

    # -- public, thread-safe

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> RequestHandle:
        """Queue a request. Raises ValueError for a request the engine cannot decode (the caller's 400),
        QueueFull when `max_queue` requests are already waiting."""
        return self.submit_many([request], [sink])[0]

    def submit_many(self, requests: list[GenerationRequest],
                    sinks: list[Callable[[Event], None]]) -> list[RequestHandle]:
        """Queue several requests (a completions call with a list of prompts): all of them, or none."""
        states = [_Request(r, sink, self.validate(r), remaining=r.n) for r, sink in zip(requests, sinks)]
        with self._cv:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if len(self._waiting) + len(states) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self._waiting.extend(states)
            self._cv.notify()
        return [RequestHandle(self, s) for s in states]

    def open(self, requests: list[GenerationRequest]) -> "AsyncStream":
        """Submit from a coroutine; see `AsyncStream`."""
        return AsyncStream(self, requests)

    def cancel(self, state: _Request) -> None:
        with self._cv:
            state.cancelled = True
            try:
                self._waiting.remove(state)  # a waiting request leaves the queue now
            except ValueError:
                pass  # decoding (its rows leave at the next step) or already done
            self._cv.notify()

    def validate(self, request: GenerationRequest) -> list[int]:
        return validate_request(self.model, self.max_batch, request)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._batch.rows) if self._batch is not None else 0

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="prlhf-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting requests, fail those not finished, and join the engine thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._fail_all("the server is shutting down")

    # -- the loop

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and self._batch is None:
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - fail this batch, keep serving
                log.exception("engine step failed")
                self._fail_all(f"internal error while decoding: {type(exc).__name__}: {exc}")

    def run_until_idle(self) -> None:
        """Decode in the calling thread until nothing is waiting or running (tests, benchmarks; not with start())."""
        while self._waiting or self._batch is not None:
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step: retire cancelled rows, admit and prefill waiting requests, decode one token."""
        self._retire()
        admitted = self._admit()
        if admitted:
            self._prefilling = admitted
            self._prefill(admitted)
            self._prefilling = []
        if self._batch is not None:
            self._decode()
        self.stats["steps"] += 1

    def _admit(self) -> list[_Request]:
        """Waiting requests that fit into the batch now (whole requests, in arrival order)."""
        if self._batch is not None and not self._batch.mergeable:
            return []
        room = self.max_batch - self.running
        taken = []
        with self._cv:
            while self._waiting and self._waiting[0].request.n <= room:
                req = self._waiting.popleft()
                if req.cancelled:
                    continue
                taken.append(req)
                room -= req.request.n
        return taken

    def _prefill(self, requests: list[_Request]) -> None:
        m = self.model
        users: UserTable = m.users  # one snapshot for the whole group (a user onboarded meanwhile: next group)
        rows, prompts, user_idx, texts = [], [], [], []
        for req in requests:
            r = req.request
            resolved = users.resolve(r.user_id, bool(req.text_ids))
            req.emit(Admitted(resolved, len(r.prompt_ids)))
            self.stats["requests"] += 1
            for i in range(r.n):
                rows.append(_Row(req, i, RowSampler.create(r.params, m.device, i),
                                 IncrementalText(m.tokenizer, r.params.stop)))
                prompts.append(r.prompt_ids)
                user_idx.append(resolved.index)
                texts.append(req.text_ids)
        embeds, mask, positions = m.prefill_inputs(prompts, users, user_idx, texts)
        logits, cache = m.forward(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        self.stats["prefills"] += 1
        tokens = self._choose(logits, rows)
        next_pos = mask.long().sum(dim=1)
        if self._batch is None:
            self._batch = _Batch(rows, cache, mask, next_pos, tokens, kv_cache.mergeable(cache))
        else:
            b = self._batch
            b.cache, b.mask = kv_cache.merge(b.cache, b.mask, cache, mask)
            b.rows = b.rows + rows
            b.next_pos = torch.cat([b.next_pos, next_pos])
            b.last = torch.cat([b.last, tokens])
        self._advance(rows, tokens)
        self._retire()

    def _decode(self) -> None:
        b = self._batch
        mask = torch.cat([b.mask, b.mask.new_ones(len(b.rows), 1)], dim=1)
        logits, b.cache = self.model.forward(input_ids=b.last.unsqueeze(1), attention_mask=mask,
                                             position_ids=b.next_pos.unsqueeze(1), cache=b.cache)
        b.mask = mask
        b.next_pos = b.next_pos + 1
        b.last = self._choose(logits, b.rows)
        self._advance(b.rows, b.last)
        self._retire()

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        return choose_tokens(logits, [r.sampler for r in rows], [len(r.token_ids) for r in rows], self.model.eos_ids)

    def _advance(self, rows: list[_Row], tokens: torch.Tensor) -> None:
        """Append each row's new token; hand out the text that is safe to send; finish rows that are done."""
        eos = set(self.model.eos_ids)
        for row, token in zip(rows, tokens.tolist()):
            if row.finished or row.req.cancelled:
                continue
            row.token_ids.append(token)
            self.stats["tokens"] += 1
            if token in eos:
                self._finish(row, "stop", row.text.flush())
                continue
            delta = row.text.update(row.token_ids)
            if row.text.stopped:
                self._finish(row, "stop", delta)
            elif len(row.token_ids) >= row.sampler.params.max_tokens:
                self._finish(row, "length", delta + row.text.flush())
            elif delta:
                row.req.emit(TextDelta(row.index, delta))

    def _finish(self, row: _Row, reason: str, delta: str) -> None:
        row.finished = True
        req = row.req
        if delta:
            req.emit(TextDelta(row.index, delta))
        req.emit(SequenceDone(row.index, reason, row.text.text, list(row.token_ids)))
        req.remaining -= 1
        if req.remaining == 0:
            req.done = True
            req.emit(RequestDone())

    def _retire(self) -> None:
        """Drop finished rows and rows of cancelled requests from the batch (and their cache rows)."""
        b = self._batch
        if b is None:
            return
        keep = [i for i, r in enumerate(b.rows) if not r.finished and not r.req.cancelled]
        if len(keep) == len(b.rows):
            return
        for r in b.rows:
            if r.req.cancelled:
                r.req.done = True
        if not keep:
            self._batch = None
            return
        idx = torch.tensor(keep, device=b.mask.device)
        b.mask = kv_cache.select_rows(b.cache, b.mask, idx)
        if b.mergeable:
            b.mask = kv_cache.trim_left(b.cache, b.mask)
        b.rows = [b.rows[i] for i in keep]
        b.next_pos, b.last = b.next_pos[idx], b.last[idx]

    def _fail_all(self, message: str) -> None:
        """Fail every request the engine holds (after an internal error, or at shutdown)."""
        with self._cv:
            waiting = list(self._waiting)
            self._waiting.clear()
        held = {id(r.req): r.req for r in self._batch.rows} if self._batch is not None else {}
        held.update({id(r): r for r in self._prefilling})
        self._batch, self._prefilling = None, []
        for req in list(held.values()) + waiting:
            if not req.done:
                req.done = True
                req.emit(RequestDone(error=message))


# ------------------------------------------------------------------------------------------------------- asyncio


class EventStream:
    """`async for k, event in stream`: the events of `n_requests` requests as they arrive in `self._queue`, k the
    request's index; the loop ends after every request's `RequestDone`. A backend's stream puts the events on the
    queue and says how `cancel()` frees its requests (the server calls it when a client leaves early)."""

    def __init__(self, n_requests: int):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = n_requests

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, Event]:
        if self._open == 0:
            raise StopAsyncIteration
        k, event = await self._queue.get()
        if isinstance(event, RequestDone):
            self._open -= 1
        return k, event

    def cancel(self) -> None:
        raise NotImplementedError


class AsyncStream(EventStream):
    """The events of one or more requests of the built-in engine, for a coroutine (see `EventStream`). Submits at
    construction (raising ValueError / QueueFull there, before any response is started). Must be created on the
    event loop's thread. `cancel()` (or leaving the loop early and calling it) frees the requests' slots."""

    def __init__(self, engine: Engine, requests: list[GenerationRequest]):
        super().__init__(len(requests))
        self._loop = asyncio.get_running_loop()
        self._handles = engine.submit_many(requests, [self._sink(k) for k in range(len(requests))])

    def _sink(self, k: int) -> Callable[[Event], None]:
        def push(event: Event) -> None:  # engine thread -> event loop
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (k, event))
        return push

    def cancel(self) -> None:
        for h in self._handles:
            if not h.done:
                h.cancel()
