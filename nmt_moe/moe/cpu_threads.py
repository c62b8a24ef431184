"""Per-expert CPU work on single-threaded workers: each worker runs whole experts, one group of them.

Why: with 32 experts, 4,096 tokens and k = 2 each expert sees ~256 rows, and MKL splits GEMMs that small
over its threads poorly. The experts are independent (nothing to synchronise but the end), so one
single-threaded worker per thread, each running whole experts, does better: fwd+bwd 1.03-1.19x the serial
loop at 32 experts, 1.09-1.39x at 128 (`scripts/bench_moe.py --grid workers`, docs/SPEED.md). With 4
experts per worker it does not pay, with 8 it breaks even, and small batches (decoding) lose to the
hand-off, hence MIN_EXPERTS_PER_WORKER and MIN_ROWS_PER_WORKER.
Used by `experts._SortedExpertFFN` on CPU; elsewhere (GPU, one thread, few experts, lopsided loads) the
experts run one after another, each GEMM on all of torch's threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

MIN_EXPERTS_PER_WORKER = 12  # measured with 2 workers (see above); tune with bench_moe --grid workers
MIN_ROWS_PER_WORKER = 512  # 320 rows per worker (32 experts, 320 tokens, k = 2) ran 0.94x serial
MAX_IMBALANCE = 1.1  # the fullest worker may hold this many times the mean rows, or all run serially

_pool: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool)
_pool_lock = threading.Lock()


def for_each_expert(
    parts: Sequence[tuple[int, slice]], work: Callable[[int, slice], None], device: torch.device
) -> None:
    """Call work(expert, rows) once per part: on CPU split over torch's intra-op threads where it pays.

    `work` must only write its own expert's rows and gradient slots; it runs without autograd recording
    (as inside an autograd.Function) and in the caller's inference mode.
    """
    threads = torch.get_num_threads()
    groups = balanced_groups(parts, threads) if device.type == "cpu" else None
    if groups is None:
        for expert, rows in parts:
            work(expert, rows)
        return
    inference = torch.is_inference_mode_enabled()
    futures = [_worker_pool(threads).submit(_run_group, group, work, inference) for group in groups]
    for future in futures:
        future.result()  # re-raises a worker's exception here


def balanced_groups(parts: Sequence[tuple[int, slice]], workers: int) -> list[list[tuple[int, slice]]] | None:
    """Split the parts into `workers` groups of similar row counts (largest first, each to the emptiest
    group), or None when the serial loop is better: too few experts or rows per worker, or loads that do not
    balance."""
    if workers < 2 or len(parts) < workers * MIN_EXPERTS_PER_WORKER:  # checked first: runs at every call
        return None
    rows = [part[1].stop - part[1].start for part in parts]
    total = sum(rows)
    if total < workers * MIN_ROWS_PER_WORKER:
        return None
    groups: list[list[tuple[int, slice]]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for i in sorted(range(len(parts)), key=lambda i: -rows[i]):
        emptiest = loads.index(min(loads))
        groups[emptiest].append(parts[i])
        loads[emptiest] += rows[i]
    if max(loads) > MAX_IMBALANCE * total / workers:
        return None
    return groups


def _run_group(group: list[tuple[int, slice]], work: Callable[[int, slice], None], inference: bool) -> None:
    with torch.inference_mode(inference), torch.no_grad():  # grad and inference modes are per thread
        for expert, rows in group:
            work(expert, rows)


def _single_threaded_worker() -> None:
    torch.get_num_threads()  # let torch initialise this thread's settings first, or it overrides ours later
    torch.set_num_threads(1)  # this thread only (OpenMP and MKL settings are per thread) ...


def _worker_pool(threads: int) -> ThreadPoolExecutor:
    """The process's pool of `threads` single-threaded workers, started now if needed."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != threads:  # first use, or torch.set_num_threads changed the count
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            pool = ThreadPoolExecutor(threads, "nmt-moe-experts", initializer=_single_threaded_worker)
            started = threading.Barrier(threads)  # holds each task until all `threads` workers exist
            list(pool.map(lambda _: started.wait(), range(threads)))
            torch.set_num_threads(threads)  # ... but also torch's default for new threads: restore it
            _pool = (threads, pool)
        return _pool[1]


def _forget_pool_after_fork() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_pool_after_fork)
