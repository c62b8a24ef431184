"""Dynamic batching: many concurrent requests, one model worker, each request gets exactly its answers.

Requests are queued as `Job`s (already tokenized by the caller). One worker thread owns the model: it
takes the oldest job, waits up to `max_wait_s` for more, and gathers queued jobs until `batch_tokens`
source tokens; jobs with the same search settings (beam, n-best) are then translated together by
`translate_sources` (sorted by length, batched by `max_tokens` / `max_sentences`, results back in order),
and each job's slice of the results is set on its future. A job that fails fails alone with its group;
the worker keeps serving.

Why the outputs do not depend on which requests shared a batch: beam search and greedy decoding decode
every sentence independently of the others in its batch (sentences leave the batch as they finish; tests
check batched == one at a time), and jobs only share a search when their settings are equal. What can move
is the last bits of a score (matrix products of other shapes), never a token in practice.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from nmt_moe.data.text_io import one_line
from nmt_moe.data.tokenizer import Tokenizer
from nmt_moe.decoding.options import BatchOptions, DecodeOptions
from nmt_moe.decoding.translate import translate_sources

BATCH_TOKENS = 8192  # source tokens the worker gathers from queued requests per round
MAX_WAIT_S = 0.005  # how long the worker waits for more requests after the first


@dataclass(frozen=True)
class Settings:
    """The per-request search settings; jobs share a search only when these are equal."""

    beam: int
    nbest: int


@dataclass
class Job:
    sources: list[list[int]]  # model input ids per line ([] = nothing to translate)
    settings: Settings
    future: Future = field(default_factory=Future)  # -> list[list[str]]: n-best texts per line

    @property
    def tokens(self) -> int:
        return sum(map(len, self.sources))


@dataclass
class BatcherStats:
    jobs: int = 0
    gathers: int = 0  # worker wake-ups, each serving every job gathered (fewer than jobs = batching)
    searches: int = 0  # translate_sources calls (one per settings group and gather)
    sentences: int = 0
    busy_s: float = 0.0  # time the worker spent serving (the rest it waited for requests)


class DynamicBatcher:
    """Owns the model; `submit` from any thread, results come back on the job's future."""

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        base_options: DecodeOptions,
        *,
        batch_tokens: int = BATCH_TOKENS,
        max_wait_s: float = MAX_WAIT_S,
        max_tokens: int = BatchOptions.max_tokens,
        max_sentences: int = BatchOptions.max_sentences,
    ) -> None:
        self.model, self.tokenizer, self.base_options = model, tokenizer, base_options
        self.batch_tokens, self.max_wait_s = batch_tokens, max_wait_s
        self.max_tokens, self.max_sentences = max_tokens, max_sentences
        self.stats = BatcherStats()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="nmt-moe-model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop after the jobs already queued."""
        self._queue.put(None)
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, sources: list[list[int]], settings: Settings) -> Future:
        job = Job(sources, settings)
        self._queue.put(job)
        return job.future

    def _run(self) -> None:
        while True:
            jobs, stop = self._gather()
            if jobs:
                self._serve(jobs)
            if stop:
                return

    def _gather(self) -> tuple[list[Job], bool]:
        """The oldest job plus whatever arrives within max_wait_s, up to batch_tokens; (jobs, stop)."""
        first = self._queue.get()
        if first is None:
            return [], True
        jobs, tokens = [first], first.tokens
        deadline = time.monotonic() + self.max_wait_s
        while tokens < self.batch_tokens:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            tokens += job.tokens
        return jobs, False

    def _serve(self, jobs: Sequence[Job]) -> None:
        start = time.perf_counter()
        self.stats.jobs += len(jobs)
        self.stats.gathers += 1
        self.stats.sentences += sum(len(job.sources) for job in jobs)
        groups: dict[Settings, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.settings, []).append(job)
        for settings, group in groups.items():
            self.stats.searches += 1
            try:
                texts = self._translate([s for job in group for s in job.sources], settings)
            except Exception as error:  # noqa: BLE001 - the worker must outlive any one bad search
                for job in group:
                    job.future.set_exception(error)
                continue
            first = 0
            for job in group:
                job.future.set_result(texts[first : first + len(job.sources)])
                first += len(job.sources)
        self.stats.busy_s += time.perf_counter() - start

    def _translate(self, sources: list[list[int]], settings: Settings) -> list[list[str]]:
        """n-best texts per source, each made one line as `translate` makes it."""
        options = dataclasses.replace(self.base_options, beam_size=settings.beam, nbest=settings.nbest)
        results = translate_sources(
            self.model, sources, options, max_tokens=self.max_tokens, max_sentences=self.max_sentences
        )
        flat = self.tokenizer.decode([h.tokens for nbest in results for h in nbest])
        texts, start = [], 0
        for nbest in results:
            texts.append([one_line(t) for t in flat[start : start + len(nbest)]] or [""])
            start += len(nbest)
        return texts
