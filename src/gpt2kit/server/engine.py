"""Continuous batching: one background thread owns the model and steps every active request together.

Each completion (one choice of one prompt) gets a row of the model's static KV cache. New requests are
prefilled into free rows (`rows=slice(b, b + k)`: prompts of similar length together) while the others
wait one step; every decode step then feeds the newest token of every active row, at that row's own
position, in one forward pass. Rows leave the batch when they finish, are cancelled (a client went
away) or pass their deadline, and their row is reused by the next request in the queue.

Per-row state and every model call come from gpt2kit.decode's step API, as generate.py's loop uses it: a
`Row` (seeded generator, stop strings, incremental UTF-8, held-back text, logprobs), `prefill`,
`decode_step`, `slide_window` and `advance`; so choice `index` of a request seeded `s` produces the same
text as sample `index` of `Generator.generate(prompt, cfg, nsamples=n)`."""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from gpt2kit.decode import (
    Delta,
    GenerationConfig,
    Row,
    TokenInfo,
    advance,
    decode_step,
    prefill,
    prepare_decoding_,
    slide_window,
    usable_vocab,
    window_notice,
)
from gpt2kit.errors import Gpt2kitError
from gpt2kit.model import GPT
from gpt2kit.tokenizer import Tokenizer

__all__ = ["BatchEngine", "EngineClosed", "EngineStats", "PromptInfo", "QueueFull", "QueueTimeout", "Stream"]

log = logging.getLogger("gpt2kit.server")


class QueueFull(Gpt2kitError):
    """The engine's queue has no room for the request; try again shortly (HTTP 429)."""


class EngineClosed(Gpt2kitError):
    """The engine has been shut down."""


class QueueTimeout(Gpt2kitError):
    """A completion's timeout passed while it still waited for a cache row (the server is busy; HTTP 503)."""


@dataclass
class PromptInfo:
    """Log-probabilities of the prompt's own tokens (first entry None: nothing predicts it)."""
    index: int
    info: list[TokenInfo | None]


@dataclass
class EngineStats:
    active: int = 0  # rows decoding now
    queued: int = 0  # rows waiting for a free cache row
    completed: int = 0  # rows finished since start
    tokens: int = 0  # tokens generated since start
    steps: int = 0  # batched decode steps since start


@dataclass(eq=False)
class _Job:
    """A Row and what the engine needs besides: the stream it reports to, its deadline, its cache row."""
    row: Row
    stream: Stream
    deadline: float | None
    prompt_logprobs: int | None
    score_only: bool  # max_tokens == 0: only the prompt's logprobs are wanted
    cancelled: bool = False
    slot: int = -1

    def expired(self, now: float) -> bool:
        return self.deadline is not None and self.deadline < now


_WAKE = object()  # queued by Stream.cancel()


class Stream:
    """The deltas of one or more rows, in the order they are produced; each row's last delta has its
    `finish_reason`. Iterate with `async for` when submitted from a running event loop (or take everything
    that has arrived at once with `await next_batch()`), with `for` otherwise. `cancel()` frees the rows at
    the engine's next step.

    Inside an event loop, the engine appends to the stream's buffer and wakes its consumer once per engine
    step for all the streams of that loop (one `call_soon_threadsafe` per step, not one per token)."""

    def __init__(self, engine: BatchEngine, n_rows: int):
        self._engine = engine
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._q: queue.SimpleQueue | None = None if self._loop else queue.SimpleQueue()
        self._buf: deque = deque()  # event-loop mode: items from the engine (deque appends are thread-safe)
        self._waiter: asyncio.Future | None = None  # the consumer waiting for items (loop thread only)
        self._left = n_rows
        self._jobs: list[_Job] = []
        self.timeout: float | None = None  # submit_many's, for the QueueTimeout message
        self.prompt_info: dict[int, list[TokenInfo | None]] = {}  # set before that row's first delta

    # -- engine side (any thread) --
    def _put(self, item: Delta | PromptInfo | BaseException | object) -> None:
        if self._q is not None:
            self._q.put(item)
            return
        self._buf.append(item)
        self._engine._dirty_stream(self)  # woken at the end of the engine's step (BatchEngine._flush)

    def _wake_consumer(self) -> None:  # in the loop's thread
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- consumer side --
    def cancel(self) -> None:
        if self._left > 0:
            self._left = 0
            if self._q is not None:
                self._q.put(_WAKE)
            else:  # a consumer waiting for the next delta stops waiting
                self._buf.append(_WAKE)
                self._engine._dirty_stream(self)
                self._engine._flush()
        for j in self._jobs:
            j.cancelled = True
        self._engine._wake()

    def _take(self, item: Delta | PromptInfo | BaseException | object) -> Delta | None:
        if item is _WAKE:
            return None
        if isinstance(item, BaseException):
            self.cancel()
            raise item
        if isinstance(item, PromptInfo):
            self.prompt_info[item.index] = item.info
            return None
        if item.finish_reason is not None:
            self._left -= 1
        return item

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self

    async def next_batch(self) -> list[Delta]:
        """Every delta that has arrived (waiting for at least one); [] once the stream has ended. Raises
        the error that ended the stream, after the deltas before it have been returned."""
        if self._loop is None:
            raise TypeError("this stream was submitted outside an event loop: iterate it with `for`")
        out: list[Delta] = []
        while self._left > 0:
            if not self._buf:
                if out:
                    break
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            if out and isinstance(self._buf[0], BaseException):
                break  # return what came before the error first
            d = self._take(self._buf.popleft())
            if d is not None:
                out.append(d)
        return out

    async def __anext__(self) -> Delta:
        if self._loop is None:
            raise TypeError("this stream was submitted outside an event loop: iterate it with `for`")
        while self._left > 0:
            if not self._buf:
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            d = self._take(self._buf.popleft())
            if d is not None:
                return d
        raise StopAsyncIteration

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        if self._q is None:
            raise TypeError("this stream was submitted inside an event loop: iterate it with `async for`")
        while self._left > 0:
            d = self._take(self._q.get())
            if d is not None:
                return d
        raise StopIteration


def _wake_streams(streams: list[Stream]) -> None:
    """In an event loop's thread: wake the consumers of `streams` (one call per engine step and loop)."""
    for st in streams:
        st._wake_consumer()


class BatchEngine:
    """Continuous batching over one model. `max_batch` cache rows of `max_len` positions (default: the
    model's context) are allocated once; at most `max_queue` rows wait for one. The model belongs to the
    engine's thread while it runs: don't generate with it elsewhere at the same time."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int = 8, max_queue: int = 64,
                 max_len: int | None = None, prefill_budget: int = 1024):
        if max_batch < 1:
            raise Gpt2kitError(f"max batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise Gpt2kitError(f"max queue must be >= 1, got {max_queue}")
        self.model = model
        self.tokenizer = tokenizer
        # ids past the tokenizer's vocabulary (a checkpoint padded to 50304) have no text: their logits
        # columns are dropped wherever tokens are picked or reported, as generate.stream_rows does
        self.n_vocab = usable_vocab(model, tokenizer)
        self.max_batch = max_batch
        self.max_queue = max_queue
        ctx = model.config.n_positions
        if max_len is not None and max_len > ctx:
            raise Gpt2kitError(f"--max-len {max_len} is longer than the model's context of {ctx} positions: give at "
                               f"most {ctx}, or leave it out for the whole context")
        self.max_len = max_len or ctx
        if self.max_len < 2:
            raise Gpt2kitError(f"max length must be >= 2 positions, got {self.max_len}")
        self.prefill_budget = prefill_budget  # prompt tokens prefilled between two decode steps
        self.stats = EngineStats()
        self._pending: deque[_Job] = deque()
        self._slots: list[_Job | None] = [None] * max_batch  # touched by the engine thread only
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._abort: EngineClosed | None = None  # set by abort(): the engine thread fails every row with it
        self._dirty: dict[int, Stream] = {}  # streams with new items since the last _flush (by id)
        self._dirty_lock = threading.Lock()
        self._warned_window = False

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> BatchEngine:
        with self._cv:
            if self._closed:
                raise EngineClosed("the engine has been closed")
            if self._thread is not None:
                return self
            self.model.eval()
            prepare_decoding_(self.model)  # as Generator does: faster decoding, identical numerics
            self.model.setup_caches(self.max_batch, self.max_len)
            self._thread = threading.Thread(target=self._run, name="gpt2kit-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = 30.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all(EngineClosed("the server is shutting down"))
        self._flush()

    def _fail_all(self, err: EngineClosed) -> None:
        """End every queued and running completion with `err` (called by the engine thread, or once it
        has stopped)."""
        with self._cv:
            pending = list(self._pending)
            self._pending.clear()
            self.stats.queued = 0
        for j in pending:
            if not j.cancelled:
                j.stream._put(err)
        for b, j in enumerate(self._slots):
            if j is not None:
                self._fail(b, err)

    def abort(self, message: str = "the server is shutting down") -> None:
        """End every queued and running completion at the engine's next step: their streams raise
        EngineClosed(message). The engine itself keeps running (a server shutting down uses this so that
        requests still in flight get an answer rather than a cut connection)."""
        with self._cv:
            self._abort = EngineClosed(message)
            self._cv.notify_all()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self):  # -> Self (typing.Self needs Python 3.11)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _dirty_stream(self, stream: Stream) -> None:
        with self._dirty_lock:
            self._dirty[id(stream)] = stream

    def _flush(self) -> None:
        """Wake the consumers of every stream that got items since the last flush: one thread-safe call per
        event loop (the engine calls this once per step)."""
        with self._dirty_lock:
            if not self._dirty:
                return
            dirty, self._dirty = list(self._dirty.values()), {}
        by_loop: dict[asyncio.AbstractEventLoop, list[Stream]] = {}
        for st in dirty:
            by_loop.setdefault(st._loop, []).append(st)  # type: ignore[arg-type]
        for loop, streams in by_loop.items():
            try:
                loop.call_soon_threadsafe(_wake_streams, streams)
            except RuntimeError:  # the consumer's event loop is gone: nobody will read these
                for st in streams:
                    st._left = 0
                    for j in st._jobs:
                        j.cancelled = True

    # ---- submitting -----------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], cfg: GenerationConfig, index: int = 0, *,
               timeout: float | None = None, prompt_logprobs: int | None = None) -> Stream:
        """One completion of `prompt_ids`; `index` picks its seed stream (sample `index` of a request)."""
        return self.submit_many([(prompt_ids, index)], cfg, timeout=timeout, prompt_logprobs=prompt_logprobs)

    def submit_many(self, rows: Sequence[tuple[Sequence[int], int]], cfg: GenerationConfig, *,
                    timeout: float | None = None, prompt_logprobs: int | None = None) -> Stream:
        """Several completions as one stream, admitted all or none: (prompt_ids, index) per row.
        cfg.max_new_tokens == 0 scores the prompt only (with prompt_logprobs). After `timeout` seconds
        running rows end with finish_reason "length", and the stream raises QueueTimeout if a row is still
        waiting for a cache row then. Raises QueueFull when the queue has no room, Gpt2kitError for
        invalid input."""
        score_only = cfg.max_new_tokens == 0
        (replace(cfg, max_new_tokens=1) if score_only else cfg).validate()
        if score_only and prompt_logprobs is None:
            raise Gpt2kitError("length must be > 0 tokens unless the prompt's logprobs are asked for")
        if cfg.logprobs is not None and cfg.logprobs < 0:
            raise Gpt2kitError(f"logprobs must be >= 0, got {cfg.logprobs}")
        if not rows:
            raise Gpt2kitError("nothing to generate: no prompts")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise Gpt2kitError(f"timeout must be a finite number of seconds > 0, got {timeout}")
        if len(rows) > self.max_queue:
            raise Gpt2kitError(f"a request of {len(rows)} completions (prompts x n) exceeds the server's queue of "
                               f"{self.max_queue} (its --max-queue): ask for at most {self.max_queue}")
        vocab = self.n_vocab
        for ids, _ in rows:
            if len(ids) == 0:
                raise Gpt2kitError("empty prompt: give some text, or generate unconditionally "
                                   "(starts from <|endoftext|>)")
            if min(ids) < 0 or max(ids) >= vocab:
                raise Gpt2kitError(f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        stream = Stream(self, len(rows))
        stream.timeout = timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        device = self.model.device
        for ids, index in rows:
            r = Row(index, "", ids, cfg, self.tokenizer, device)
            stream._jobs.append(_Job(r, stream, deadline, prompt_logprobs, score_only))
        with self._cv:
            if self._closed:
                raise EngineClosed("the engine has been closed")
            if len(self._pending) + len(rows) > self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._pending)} completions are waiting "
                                f"(queue of {self.max_queue}); retry shortly")
            self._pending.extend(stream._jobs)
            self.stats.queued = len(self._pending)
            self._cv.notify_all()
        return stream

    # ---- the engine thread ----------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and self._abort is None and not self._pending and not any(self._slots):
                    self._cv.wait()
                if self._closed:
                    return
                err, self._abort = self._abort, None
            if err is not None:
                self._fail_all(err)
                self._flush()
                continue
            try:
                self._admit()
                self._decode_step()
            except Exception as e:  # never let the worker die: fail the rows in flight and go on
                log.exception("engine step failed")
                for b, j in enumerate(self._slots):
                    if j is not None:
                        self._fail(b, e)
            self._flush()  # one wake-up per event loop for every stream this step wrote to

    def _free(self, b: int) -> None:
        self._slots[b] = None
        self.stats.active = sum(j is not None for j in self._slots)

    def _fail(self, b: int, e: Exception) -> None:
        job = self._slots[b]
        self._free(b)
        if job is not None and not job.cancelled:
            job.stream._put(e if isinstance(e, Gpt2kitError) else Gpt2kitError(f"generation failed: {e}"))

    def _emit(self, b: int) -> None:
        job = self._slots[b]
        d = job.row.delta()
        if d is not None:
            self.stats.tokens += len(d.tokens)
            job.stream._put(d)
        if job.row.done:
            self.stats.completed += 1
            self._free(b)

    def _finish(self, b: int, reason: str) -> None:
        self._slots[b].row.finish(reason)
        self._emit(b)

    def _slide_notice(self) -> None:
        if not self._warned_window:
            self._warned_window = True
            window_notice()

    def _admit(self) -> None:
        """Prefill queued requests into free rows, up to `prefill_budget` prompt tokens per step: prompts
        of similar length share one forward pass over a run of adjacent rows."""
        now = time.monotonic()
        with self._cv:
            if any(j.cancelled or j.expired(now) for j in self._pending):
                for j in self._pending:
                    if j.expired(now) and not j.cancelled:  # timed out before it began: an error, not text
                        j.stream._put(QueueTimeout(
                            f"the server is busy: this request waited its whole timeout of {j.stream.timeout:g} s "
                            f"(--request-timeout) for one of the {self.max_batch} rows (--max-batch) that "
                            f"completions are decoded in; retry later, or serve with a larger --max-batch or "
                            f"--request-timeout, or a smaller --max-queue"))
                        for other in j.stream._jobs:  # the request fails whole: its other rows stop too
                            other.cancelled = True
                self._pending = deque(j for j in self._pending if not (j.cancelled or j.expired(now)))
            free = [b for b, j in enumerate(self._slots) if j is None]
            take: list[_Job] = []
            budget = self.prefill_budget
            while self._pending and len(take) < len(free):
                cost = len(self._pending[0].row.context)
                if take and cost > budget:
                    break
                budget -= cost
                take.append(self._pending.popleft())
            self.stats.queued = len(self._pending)
        if not take:
            return
        for job in take:
            # as stream_rows. Scoring only (max_new_tokens 0), a prompt that fills the window needs no room
            # for a next token: it is read whole, every token scored
            if job.row.fit_window(self.max_len):
                self._slide_notice()
        take.sort(key=lambda j: len(j.row.context))  # neighbours of similar length: little padding
        for b, job in zip(free, take):
            job.slot = b
            self._slots[b] = job
        self.stats.active = sum(j is not None for j in self._slots)
        groups: list[list[_Job]] = []
        for job in take:
            g = groups[-1] if groups else None
            if (g is not None and job.prompt_logprobs is None and g[0].prompt_logprobs is None
                    and job.slot == g[-1].slot + 1
                    and len(job.row.context) <= 2 * len(g[0].row.context) + 8):
                g.append(job)
            else:
                groups.append([job])
        for g in groups:
            try:
                self._prefill(g)
            except Exception as e:
                log.exception("prefill failed")
                for job in g:
                    if self._slots[job.slot] is job:
                        self._fail(job.slot, e)

    def _prefill(self, group: list[_Job]) -> None:
        """Prefill jobs in adjacent rows with one forward pass, then pick their first tokens."""
        b0 = group[0].slot
        job = group[0]
        if job.prompt_logprobs is not None:  # alone: keep every position's logits
            r = job.row
            device = self.model.device
            T = len(r.context)
            logits = self.model(torch.tensor([r.context], device=device), torch.arange(T, device=device),
                                kv_len=T, rows=slice(b0, b0 + 1))[0, :, :self.n_vocab]  # (T, V)
            job.stream._put(PromptInfo(r.out.index, _prompt_logprobs(r, logits, job.prompt_logprobs)))
            if job.score_only:
                self._finish(b0, "length")
                return
            last = logits[-1:]  # (1, V)
        else:
            last = prefill(self.model, [j.row.context for j in group], rows=slice(b0, b0 + len(group)))
        self._advance(group, last)  # (k, V)

    def _advance(self, jobs: list[_Job], logits: torch.Tensor) -> None:
        """Next tokens for `jobs` from their logits (k, V), as stream_rows picks them; then their deltas."""
        advance([j.row for j in jobs], logits[:, :self.n_vocab])
        for j in jobs:
            self._emit(j.slot)

    def _decode_step(self) -> None:
        now = time.monotonic()
        for b, job in enumerate(self._slots):
            if job is None:
                continue
            if job.cancelled:
                self._free(b)
            elif job.expired(now):
                self._finish(b, "length")
        active = [b for b, j in enumerate(self._slots) if j is not None]
        if not active:
            return
        for b in active:
            if slide_window(self.model, self._slots[b].row, b):  # as stream_rows does
                self._slide_notice()
        # with CUDA graphs every step runs all rows (one graph per batch size; a GPU step at these sizes costs
        # about the same for 1 row as for all); free rows below `hi` ride along (decode_step)
        hi = self.max_batch if self.model.graph_step is not None else active[-1] + 1
        jobs = [self._slots[b] for b in active]
        logits = decode_step(self.model, [None if j is None else j.row for j in self._slots[:hi]])  # (hi, V)
        self.stats.steps += 1
        self._advance(jobs, logits if len(active) == hi else logits[active])


def _prompt_logprobs(r: Row, logits: torch.Tensor, top_n: int) -> list[TokenInfo | None]:
    """logits (T, V) over r.context -> one entry per prompt token; None where nothing predicts it (the
    first token, and tokens the window cut off). token_logprobs() for all positions at once."""
    T = len(r.context)
    out: list[TokenInfo | None] = [None] * (len(r.out.prompt_tokens) - T + 1)
    if T < 2:
        return out
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)  # (T-1, V): position t-1 predicts token t
    nxt = torch.tensor(r.context[1:], device=lp.device)
    chosen = lp.gather(1, nxt[:, None])[:, 0].tolist()
    vals, ids = torch.topk(lp, top_n, dim=-1) if top_n > 0 else (lp[:, :0], nxt[:, None][:, :0])
    for tok, p, i, v in zip(r.context[1:], chosen, ids.tolist(), vals.tolist()):
        out.append(TokenInfo(tok, p, list(zip(i, v))))
    return out
