"""The request queue and the generation worker of the local server.

Requests wait in a bounded queue; when it is full, `submit` refuses at once (the server answers
503) instead of letting the backlog and every client's latency grow without limit. One worker
thread owns the model and batches continuously: between two decode steps it takes what is queued
(up to `max_batch` requests in flight; when idle it waits `batch_wait` seconds for company), routes
the newcomers with one layer-0 pass of the gate and prefills them into the running batch of their
route; a request leaves the batch as soon as it finishes. Each route has a batch of its own (the
adapter is a switch on the whole model, so two routes cannot share a forward pass), and the live
routes take one step each in turn. Scoring requests (echo with logprobs) have their prompt scored
when they are admitted; with max_tokens 0 nothing is generated. Results travel back to the asyncio
side of the server as events on each request's own queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from prism.routed import PrismModel, Route
from prism.serve.decode import DecodeBatch, Row, Sampling, logprob_lists

log = logging.getLogger("prism.serve")


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One request in flight. Events for the client: ("route", Route), ("delta", str),
    ("done", (finish_reason, completion_tokens)), ("error", message); with echo and logprobs
    ("prompt_logprobs", lists) first, and with logprobs ("logprobs", lists) before "done"
    (lists: serve.decode.logprob_lists)."""

    prompt_ids: list[int]
    sampling: Sampling
    forced: Route | None  # None: the gate decides from `routing_prompt` (and the named `context`)
    routing_prompt: str | None
    context: str | None
    loop: asyncio.AbstractEventLoop
    echo: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    finished: bool = False
    row: Row | None = None  # set while it is decoded
    tokens_at_cancel: int = 0

    def cancel(self) -> None:
        """The client left: the worker drops the job from its queue or batch at the next step."""
        if not self.cancelled and not self.finished:
            self.tokens_at_cancel = self.row.n_tokens if self.row else 0
            self.cancelled = True

    def send(self, kind: str, payload) -> None:
        if kind in ("done", "error"):
            self.finished = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled = True


class Batcher:
    def __init__(self, prism: PrismModel, max_batch: int = 16, max_queue: int = 64, batch_wait: float = 0.01):
        self.prism = prism
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        # cancelled: requests whose client left mid-generation; tokens_after_cancel: what the worker
        # still generated for them after they left (at most one decode step each, so the most for
        # one request, max_tokens_after_cancel, is at most 1); cancelled_queued: clients that left
        # while their request waited in the queue (it never ran).
        self.stats = {"requests": 0, "rejected": 0, "batches": 0, "largest_batch": 0, "forward_passes": 0,
                      "completion_tokens": 0, "errors": 0, "cancelled": 0, "tokens_after_cancel": 0,
                      "max_tokens_after_cancel": 0, "cancelled_queued": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prism-batcher", daemon=True)

    # ----- the asyncio side -----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.stats["rejected"] += 1
            raise QueueFull from None
        self.stats["requests"] += 1

    # ----- the worker thread ----------------------------------------------------------------
    def _take(self, room: int, wait: bool) -> list[Job]:
        """Up to `room` queued requests. Idle (`wait`), it blocks for the first one (waking now and
        then to notice stop()) and gives others `batch_wait` seconds to come along; while it is
        decoding it takes only what is already waiting, so the running rows never stall."""
        batch: list[Job] = []
        if room <= 0:
            return batch
        try:
            batch.append(self.queue.get(timeout=0.1) if wait else self.queue.get_nowait())
        except queue.Empty:
            return batch
        deadline = time.monotonic() + (self.batch_wait if wait else 0.0)
        while len(batch) < room:
            try:
                batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        live = [j for j in batch if not j.cancelled]  # not the clients that left while queued
        self.stats["cancelled_queued"] += len(batch) - len(live)
        return live

    def _run(self) -> None:
        # Continuous batching: one DecodeBatch per route (an adapter is a switch on the whole model,
        # so two routes cannot share a forward pass). Between decode steps, waiting requests join
        # the batch of their route and finished ones leave; each live route takes one step in turn.
        groups: dict[str | None, DecodeBatch] = {}
        waiting: list[tuple[Job, str | None]] = []  # routed, for a batch that cannot take rows yet
        in_flight: list[Job] = []
        while not self._stop.is_set():
            in_flight = [j for j in in_flight if not j.finished]
            live = sum(map(len, groups.values())) + len(waiting)
            new = self._take(self.max_batch - live, wait=live == 0)
            if new:
                in_flight += new
                self._guarded(new, self._route, new, waiting)
            for name in dict.fromkeys(a for _, a in waiting):
                batch = groups.setdefault(name, DecodeBatch(self.prism.model))
                if batch.can_join:
                    jobs = [j for j, a in waiting if a == name]
                    waiting[:] = [(j, a) for j, a in waiting if a != name]
                    if not self._guarded(jobs + self._members(batch, in_flight), self._admit, name, jobs, batch):
                        batch.rows.clear()  # a failed prefill may have left the batch half-merged
            for name, batch in list(groups.items()):
                if batch and not self._guarded(self._members(batch, in_flight), self._step, name, batch):
                    batch.rows.clear()  # its requests failed
                if not batch:
                    del groups[name]
            self.stats["largest_batch"] = max(self.stats["largest_batch"], sum(map(len, groups.values())))
        for name, batch in groups.items():  # shutting down: each row's cancelled() is now true, so
            self._guarded(self._members(batch, in_flight), batch.step)  # one step ends them all

    def _guarded(self, jobs: list[Job], fn, *args) -> bool:
        """fn(*args); when it raises, the requests it was working for fail, not the server and not
        the requests of other routes. Returns whether it succeeded."""
        try:
            fn(*args)
            return True
        except Exception:
            log.exception("generation failed for %d request(s)", len(jobs))
            self.stats["errors"] += 1
            for job in jobs:
                if not job.finished:
                    job.send("error", "internal error during generation")
            return False

    def _route(self, jobs: list[Job], waiting: list) -> None:
        """The route of each new request (one cheap layer-0 pass for all the gated ones)."""
        self.stats["batches"] += 1
        gated = [j for j in jobs if j.forced is None]
        routes: dict[int, Route] = {id(j): j.forced for j in jobs if j.forced is not None}
        if gated:
            found = self.prism.route_prompts([j.routing_prompt for j in gated], [j.context for j in gated])
            routes.update({id(j): r for j, r in zip(gated, found)})
        for job in jobs:
            job.send("route", routes[id(job)])
        self.prism._log([routes[id(j)] for j in jobs])
        waiting += [(j, routes[id(j)].adapter) for j in jobs]

    def _admit(self, name: str | None, jobs: list[Job], batch: DecodeBatch) -> None:
        """Score what asks for prompt scores, then prefill the new rows into their route's batch."""
        self.prism.set_adapter(name)
        for job in jobs:
            if job.cancelled:  # the client left while its request waited for the batch
                self.stats["cancelled_queued"] += 1
                job.finished = True
        jobs = [j for j in jobs if not j.cancelled]
        self._score_prompts([j for j in jobs if j.echo and j.sampling.logprobs is not None])
        for job in jobs:
            if job.sampling.max_tokens == 0:  # scored only
                self._row(job).finish("length", 0)
        rows = [self._row(j) for j in jobs if j.sampling.max_tokens > 0]
        if rows:
            self.stats["forward_passes"] += batch.join(rows)

    @staticmethod
    def _members(batch: DecodeBatch, jobs: list[Job]) -> list[Job]:
        rows = {id(r) for r in batch.rows}
        return [j for j in jobs if id(j.row) in rows]

    def _step(self, name: str | None, batch: DecodeBatch) -> None:
        self.prism.set_adapter(name)
        self.stats["forward_passes"] += batch.step()

    def _score_prompts(self, jobs: list[Job]) -> None:
        """Each prompt token's log-probability after the tokens before it, and its alternatives."""
        if not jobs:
            return
        model = self.prism.model
        top = max(j.sampling.logprobs for j in jobs)
        scores = model.score_tokens([(j.prompt_ids[:1], j.prompt_ids[1:]) for j in jobs], top=top)
        for job, sc in zip(jobs, scores):
            alternatives = [None] + [alts[: job.sampling.logprobs] for alts in sc.top]
            job.send("prompt_logprobs", logprob_lists(model.tokenizer, job.prompt_ids, [None, *sc.logprobs],
                                                      alternatives))

    def _row(self, job: Job) -> Row:
        def finish(reason: str, n: int) -> None:
            self.stats["completion_tokens"] += n
            if reason == "cancelled" and job.cancelled:
                self.stats["cancelled"] += 1
                self.stats["tokens_after_cancel"] += n - job.tokens_at_cancel
                self.stats["max_tokens_after_cancel"] = max(self.stats["max_tokens_after_cancel"],
                                                            n - job.tokens_at_cancel)
            if job.sampling.logprobs is not None:
                ids, lps, alts = zip(*job.row.scored) if job.row.scored else ((), (), ())
                job.send("logprobs", logprob_lists(self.prism.model.tokenizer, ids, lps, alts))
            job.send("done", (reason, n))

        def fail() -> None:
            self.stats["errors"] += 1
            job.send("error", "internal error while generating this reply")

        job.row = Row(job.prompt_ids, job.sampling, emit=lambda text: job.send("delta", text), finish=finish,
                      cancelled=lambda: job.cancelled or self._stop.is_set(), fail=fail)  # shutdown ends batches
        return job.row
