"""Point-to-point KV links between the ranks of two engine instances (the "p2p" migration transport):
rank r of the source sends a stage's blocks straight to rank r of the destination over a two-member gloo
process group of their own (CUDA tensors go through host memory; gloo also takes them), instead of
through Ray's object store. Used only when both instances shard the KV the same way.

A link is opened in two calls per rank, made by the router: the destination rank `listen`s (a TCPStore
on a free port of its node), then both ranks `connect` at the same time (the gloo rendezvous). Each link
is a process group object of its own, never the default group, so it cannot disturb the instance's own
collectives. Sends and receives are one message per layer, in layer order.
"""
from __future__ import annotations

import logging
import socket
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from distinfer.worker.kv_transfer import export_blocks, import_blocks

logger = logging.getLogger(__name__)

LINK_TIMEOUT = timedelta(seconds=60)


def _node_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class KVLinks:
    """This rank's links, by id."""

    def __init__(self) -> None:
        self._stores: dict[str, dist.TCPStore] = {}
        self._groups: dict[str, tuple[dist.ProcessGroup, int]] = {}  # link id -> (group, this rank's member)

    def listen(self, link_id: str) -> tuple[str, int]:
        """The destination side: a store the source rank connects to; (host, port)."""
        store = dist.TCPStore("0.0.0.0", 0, 2, True, timeout=LINK_TIMEOUT, wait_for_workers=False)
        self._stores[link_id] = store
        return _node_address(), store.port

    def connect(self, link_id: str, host: str | None = None, port: int | None = None) -> None:
        """Join the link: the destination (after listen) as member 1, the source (given host, port) as 0.
        Both sides must call this at the same time."""
        if link_id in self._groups:
            return
        if host is None:
            store, member = self._stores[link_id], 1
        else:
            store, member = dist.TCPStore(host, port, 2, False, timeout=LINK_TIMEOUT), 0
        self._groups[link_id] = (dist.ProcessGroupGloo(store, member, 2, LINK_TIMEOUT), member)
        logger.info("KV link %s open (member %d)", link_id, member)

    def has(self, link_id: str) -> bool:
        return link_id in self._groups

    def send(self, link_id: str, kv_caches: Sequence[torch.Tensor], block_ids: list[int]) -> None:
        group, _ = self._groups[link_id]
        for layer in export_blocks(kv_caches, block_ids):
            group.send([layer.contiguous()], 1, 0).wait()

    def receive(self, link_id: str, kv_caches: Sequence[torch.Tensor], block_ids: list[int]) -> None:
        group, _ = self._groups[link_id]
        layers = []
        for cache in kv_caches:
            buffer = torch.empty((len(block_ids), *cache.shape[1:]), dtype=cache.dtype)
            group.recv([buffer], 0, 0).wait()
            layers.append(buffer)
        import_blocks(kv_caches, block_ids, layers)

    def close(self, link_id: str) -> None:
        self._groups.pop(link_id, None)
        self._stores.pop(link_id, None)
