"""The request queue and the generation worker of the local server.

Requests wait in a bounded queue; when it is full, `submit` refuses at once (the server answers
503) instead of letting the backlog and every client's latency grow without limit. One worker
thread owns the model: it takes up to `max_batch` queued requests (waiting `batch_wait` seconds
for company when the queue is short), routes all of them with one layer-0 pass of the gate, then
decodes the adapter-on group and the adapter-off group as one batch each (the adapter is a switch
on the whole model, so the two routes cannot share a forward pass). Scoring requests (echo with
logprobs) have their prompt scored in the same worker, per route group, before the group decodes;
with max_tokens 0 nothing is generated. Results travel back to the asyncio side of the server as
events on each request's own queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from prism.routed import PrismModel, Route
from prism.serve.decode import Row, Sampling, decode_batch, logprob_lists

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
    def _take_batch(self) -> list[Job]:
        try:
            batch = [self.queue.get(timeout=0.1)]  # wake up now and then to notice stop()
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        live = [j for j in batch if not j.cancelled]  # not the clients that left while queued
        self.stats["cancelled_queued"] += len(batch) - len(live)
        return live

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch()
            if not batch:
                continue
            try:
                self._serve(batch)
            except Exception:  # one bad batch must not take the server down
                log.exception("generation failed for a batch of %d", len(batch))
                self.stats["errors"] += 1
                for job in batch:
                    if not job.finished:
                        job.send("error", "internal error during generation")

    def _serve(self, batch: list[Job]) -> None:
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        gated = [j for j in batch if j.forced is None]
        routes: dict[int, Route] = {id(j): j.forced for j in batch if j.forced is not None}
        if gated:  # one cheap layer-0 pass routes the whole batch
            found = self.prism.route_prompts([j.routing_prompt for j in gated], [j.context for j in gated])
            routes.update({id(j): r for j, r in zip(gated, found)})
        for job in batch:
            job.send("route", routes[id(job)])
        self.prism._log([routes[id(j)] for j in batch])
        for _, idx in self.prism.grouped([routes[id(j)].adapter for j in batch]):
            jobs = [batch[i] for i in idx]
            self._score_prompts([j for j in jobs if j.echo and j.sampling.logprobs is not None])
            for job in jobs:
                if job.sampling.max_tokens == 0:  # scored only
                    self._row(job).finish("length", 0)
            rows = [self._row(j) for j in jobs if j.sampling.max_tokens > 0]
            if rows:
                self.stats["forward_passes"] += decode_batch(self.prism.model, rows)

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
