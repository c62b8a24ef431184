"""The CPU expert workers: how experts are shared out, and that sharing them out changes no result."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator

import pytest
import torch

from nmt_moe.moe import MoELayer, cpu_threads
from nmt_moe.moe.cpu_threads import MIN_EXPERTS_PER_WORKER, balanced_groups, for_each_expert
from nmt_moe.moe.experts import _slices

NUM_EXPERTS = 2 * MIN_EXPERTS_PER_WORKER + 8  # enough for two workers


@pytest.fixture
def two_threads() -> Iterator[None]:
    """torch on 2 intra-op threads (the workers' count), whatever this machine's default."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def worker_names(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the thread that runs each group of experts."""
    names: list[str] = []
    run_group = cpu_threads._run_group

    def recording(*args, **kwargs) -> None:
        names.append(threading.current_thread().name)
        run_group(*args, **kwargs)

    monkeypatch.setattr(cpu_threads, "_run_group", recording)
    return names


def test_groups_cover_every_expert_once_with_balanced_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(100, 400, (NUM_EXPERTS,), generator=gen).tolist()
    counts[3] = 0  # an unused expert has no part
    parts = _slices(counts)
    groups = balanced_groups(parts, 2)
    assert groups is not None and len(groups) == 2
    assert sorted(part[0] for group in groups for part in group) == [p[0] for p in parts]
    loads = [sum(rows.stop - rows.start for _, rows in group) for group in groups]
    assert max(loads) <= cpu_threads.MAX_IMBALANCE * sum(counts) / 2


def test_serial_when_splitting_does_not_pay() -> None:
    assert balanced_groups(_slices([300] * 8), 2) is None  # too few experts per worker
    assert balanced_groups(_slices([2] * NUM_EXPERTS), 2) is None  # too few rows
    assert balanced_groups(_slices([5000] + [100] * NUM_EXPERTS), 2) is None  # one expert outweighs the rest
    assert balanced_groups(_slices([300] * NUM_EXPERTS), 1) is None  # one thread


def _train_step(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(5)  # same gate noise and dropout mask in both runs
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out.y.square().sum() + out.aux_loss).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    return out.y.detach(), {"x": x.grad, **grads}


@pytest.mark.parametrize("activation,bias,dropout", [("relu", False, 0.0), ("swiglu", True, 0.2)])
def test_workers_give_the_serial_result_and_gradients(
    two_threads: None,
    worker_names: list[str],
    monkeypatch: pytest.MonkeyPatch,
    activation: str,
    bias: bool,
    dropout: float,
) -> None:
    torch.manual_seed(0)
    layer = MoELayer(32, 48, NUM_EXPERTS, k=2, activation=activation, ffn_bias=bias, dropout=dropout)
    with torch.no_grad():
        layer.gate.w_gate.normal_(std=0.5)  # spread the tokens over the experts
    x = torch.randn(1024, 32)
    y_threads, grads_threads = _train_step(layer, x)
    assert len(worker_names) == 4 and all(name.startswith("nmt-moe-experts") for name in worker_names)
    monkeypatch.setattr(cpu_threads, "balanced_groups", lambda parts, workers: None)
    y_serial, grads_serial = _train_step(layer, x)
    assert len(worker_names) == 4  # the second run stayed on this thread
    torch.testing.assert_close(y_threads, y_serial, rtol=1e-5, atol=1e-6)
    for name, grad in grads_serial.items():
        torch.testing.assert_close(grads_threads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_workers_run_single_threaded_in_the_callers_inference_mode(two_threads: None) -> None:
    parts = _slices([200] * NUM_EXPERTS)
    seen: list[tuple[str, int, bool, bool]] = []

    def work(expert: int, rows: slice) -> None:
        seen.append(
            (
                threading.current_thread().name,
                torch.get_num_threads(),
                torch.is_inference_mode_enabled(),
                torch.is_grad_enabled(),
            )
        )

    with torch.inference_mode():
        for_each_expert(parts, work, torch.device("cpu"))
    assert len(seen) == NUM_EXPERTS
    assert {entry[1:] for entry in seen} == {(1, True, False)}
    assert all(entry[0].startswith("nmt-moe-experts") for entry in seen)
    assert torch.get_num_threads() == 2  # the caller keeps its threads ...
    in_new_thread: list[int] = []
    thread = threading.Thread(target=lambda: in_new_thread.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert in_new_thread == [2]  # ... and so do threads started later


def test_eval_forward_under_inference_mode_uses_the_workers(
    two_threads: None, worker_names: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    layer = MoELayer(32, 48, NUM_EXPERTS, k=2).eval()
    with torch.no_grad():
        layer.gate.w_gate.normal_(std=0.5)
    x = torch.randn(1024, 32)
    with torch.inference_mode():
        y_threads = layer(x).y
    assert len(worker_names) == 2
    monkeypatch.setattr(cpu_threads, "balanced_groups", lambda parts, workers: None)
    with torch.inference_mode():
        y_serial = layer(x).y  # the serial loop is checked against a per-token reference in test_moe_layer
    torch.testing.assert_close(y_threads, y_serial, rtol=1e-5, atol=1e-6)


def test_a_workers_error_reaches_the_caller(two_threads: None) -> None:
    def work(expert: int, rows: slice) -> None:
        if expert == 7:
            raise RuntimeError("expert 7 failed")

    with pytest.raises(RuntimeError, match="expert 7 failed"):
        for_each_expert(_slices([200] * NUM_EXPERTS), work, torch.device("cpu"))


def _threaded_sum_in_child(queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(2)
    total = torch.zeros(NUM_EXPERTS)
    for_each_expert(
        _slices([200] * NUM_EXPERTS),
        lambda e, rows: total[e].fill_(rows.stop - rows.start),
        torch.device("cpu"),
    )
    queue.put(float(total.sum()))


def test_a_forked_child_starts_its_own_workers(two_threads: None) -> None:
    for_each_expert(_slices([200] * NUM_EXPERTS), lambda e, rows: None, torch.device("cpu"))  # pool started
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_threaded_sum_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on the parent's worker pool")
    assert child.exitcode == 0 and queue.get(timeout=5) == 200 * NUM_EXPERTS


def test_a_new_thread_count_gets_a_new_pool(two_threads: None) -> None:
    parts = _slices([200] * 3 * MIN_EXPERTS_PER_WORKER)
    seen: set[tuple[str, int]] = set()
    lock = threading.Lock()

    def work(expert: int, rows: slice) -> None:
        with lock:
            seen.add((threading.current_thread().name, torch.get_num_threads()))

    for_each_expert(parts, work, torch.device("cpu"))
    torch.set_num_threads(3)
    for_each_expert(parts, work, torch.device("cpu"))
    assert torch.get_num_threads() == 3
    assert {threads for _, threads in seen} == {1}
    assert cpu_threads._pool is not None and cpu_threads._pool[0] == 3
