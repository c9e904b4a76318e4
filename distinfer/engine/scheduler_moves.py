"""The scheduler's side of moving requests between engine instances (a mixin of Scheduler, kept apart for
size): which blocks a request's KV is in, pausing it for a move's last stage, taking it out, and taking in a
request from another instance. Uses the Scheduler's `requests`, `running`, `waiting`, `kv`, `policy`,
`block_size`, `_in_flight`, `_paused` and `_release`."""
from __future__ import annotations

from distinfer.engine.request import Request, RequestStatus


class SchedulerMoves:
    def exportable_blocks(self, request_id: str) -> list[int]:
        """The device blocks holding a request's computed tokens ([] when it holds none: waiting, or swapped
        out). Refused while a step that writes them is in flight."""
        request = self.requests[request_id]
        if request_id in self._in_flight:
            raise RuntimeError(f"request {request_id!r} is in a step that has not finished; export it after")
        if request.status != RequestStatus.RUNNING:
            return []
        return self.kv.get_block_ids(request_id)[:-(-request.num_computed_tokens // self.block_size)]

    def pause(self, request_id: str) -> None:
        """Keep a request (its blocks, its place) but schedule nothing for it and never preempt it."""
        if request_id in self._in_flight:
            raise RuntimeError(f"request {request_id!r} is in a step that has not finished; pause it after")
        self._paused.add(request_id)

    def resume(self, request_id: str) -> None:
        self._paused.discard(request_id)

    def head_of_queue(self) -> tuple[str, int] | None:
        """The first waiting request that is not paused, and the device blocks its tokens need (None: none
        waits). What the router's defragmentation frees room for."""
        for request in self.waiting:
            if request.request_id not in self._paused:
                return request.request_id, -(-request.num_tokens // self.block_size)
        return None

    @property
    def num_paused(self) -> int:
        return len(self._paused)

    def is_paused(self, request_id: str) -> bool:
        return request_id in self._paused

    def remove_request(self, request_id: str) -> Request:
        """Take an unfinished request out (it moves to another instance): freed everywhere, no output."""
        request = self.requests[request_id]
        if request_id in self._in_flight:
            raise RuntimeError(f"request {request_id!r} is in a step that has not finished; remove it after")
        self._release(request)
        return request

    def import_request(self, request: Request, has_kv: bool) -> None:
        """Take in a request from another instance. With KV (its blocks, filled, already held under its id by
        the KV manager) it runs at once, ahead of the waiting queue; without, it waits at the front like a
        preempted one and computes its tokens again."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already scheduled")
        if has_kv:
            request.status = RequestStatus.RUNNING
            self.running.append(request)
        else:
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
            self.policy.add_waiting(self.waiting, request, front=True)
        request.num_synced_tokens = 0  # the workers here have never seen it
        self.requests[request.request_id] = request
