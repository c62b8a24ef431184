"""Process groups for the distributed tests: fresh CPU processes joined by gloo."""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1, all held open until every one is chosen. Runs started
    together need their own ports: left to choose one each (Lightning's DDP launcher does), two can draw the
    same one and join each other's process group (seen: a reference run's rank 1 hung in a victim's group)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def spawn(fn: Any, *args: Any, world: int = WORLD) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes joined in a gloo process group."""
    mp.spawn(_worker, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _worker(rank: int, world: int, port: int, fn: Any, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
