"""Ray Serve request router for rtws replicas: session affinity first, then the least-loaded replica.

Runs inside Serve's proxy (and any deployment handle), never in a replica; it
imports no torch and nothing of rtws but this module.

Rules, in order (docs/scale-out.md):

1. **Affinity.** A WebSocket upgrade that offers the subprotocol
   ``rtws.replica.<id>`` goes to the replica whose id is ``<id>`` (the id a
   session's ``ready.replica`` announced), if that replica is still running.
   The proxy hands the router the ``Sec-WebSocket-Protocol`` header as the
   request's ``session_id`` when the cluster runs with
   ``RAY_SERVE_SESSION_ID_HEADER_KEY=sec-websocket-protocol``
   (:func:`rtws.ray.cluster_env` sets it). Browsers can offer a subprotocol on
   ``new WebSocket(url, protocols)``; they cannot set other headers.
   If the replica is gone, the request is routed as new; the replica it lands
   on does not hold the session and answers the resume with the documented
   resume error, never a wrong session.
2. **Least loaded.** Otherwise replicas are ranked by the live generations they
   last reported (``record_routing_stats``, every ``routing_stats_period_s``),
   draining replicas last, then by the requests (sockets, HTTP streams) this
   router has open on each, counted here exactly (``on_request_completed``), so
   a burst of new sockets spreads while the generation counts are a period
   stale. Ties are broken at random. Serve tries the ranks in order and moves
   to the next replica only if one's queue is full.
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

AFFINITY_PREFIX = "rtws.replica."


def affinity_key(session_id: str) -> str | None:
    """The replica id named in a ``session_id`` (a subprotocol list or a bare id), else None. Pure."""
    for item in session_id.split(","):
        item = item.strip()
        if item.startswith(AFFINITY_PREFIX) and len(item) > len(AFFINITY_PREFIX):
            return item[len(AFFINITY_PREFIX):]
    return None


def load_of(stats: dict[str, Any] | None, open_requests: int = 0) -> tuple[int, int, int]:
    """Sort key for a replica: (draining, live generations it last reported, requests this router has open there).

    Pure; missing stats sort as idle. The reported generations are up to a stats period old; the open
    requests (sockets, HTTP streams) are this router's own exact count, so a burst of new sockets spreads.
    """
    stats = stats or {}
    draining = 1 if stats.get("draining") else 0
    live = int(stats.get("live_generations", 0) or 0)
    return draining, live, open_requests


class RtwsRouter(RequestRouter):  # type: ignore[misc]
    """Affinity by ``rtws.replica.<id>``, else the least-loaded replica; see the module docstring."""

    MAX_TRACKED = 100_000  # open requests tracked per router (a bound, in case a completion is never reported)

    def initialize_state(self, **kwargs: Any) -> None:
        self._open: dict[Any, int] = {}  # replica id -> requests this router sent there and not completed
        self._assigned: dict[str, Any] = {}  # internal request id -> replica id

    def _track(self, pending_request: PendingRequest | None, replica: RunningReplica) -> None:
        if pending_request is None:
            return
        assigned = getattr(self, "_assigned", None)
        if assigned is None:
            self.initialize_state()
            assigned = self._assigned
        rid = pending_request.metadata.internal_request_id
        old = assigned.pop(rid, None)
        if old is not None:
            self._open[old] = max(0, self._open.get(old, 0) - 1)
        while len(assigned) >= self.MAX_TRACKED:
            stale = assigned.pop(next(iter(assigned)))
            self._open[stale] = max(0, self._open.get(stale, 0) - 1)
        assigned[rid] = replica.replica_id
        self._open[replica.replica_id] = self._open.get(replica.replica_id, 0) + 1

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        assigned = getattr(self, "_assigned", None)
        if assigned is None:
            return
        rid = assigned.pop(internal_request_id, None)
        if rid is not None:
            self._open[rid] = max(0, self._open.get(rid, 0) - 1)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            key = affinity_key(pending_request.metadata.session_id or "")
            if key is not None:
                pinned = [r for r in candidate_replicas if r.replica_id.unique_id == key]
                if pinned:
                    self._track(pending_request, pinned[0])
                    return [pinned]
        open_counts = getattr(self, "_open", {})
        shuffled = list(candidate_replicas)
        random.shuffle(shuffled)  # ties break at random
        ranked = sorted(shuffled, key=lambda r: load_of(r.routing_stats, open_counts.get(r.replica_id, 0)))
        self._track(pending_request, ranked[0])
        # One replica per rank: Serve tries the least loaded first and the next only if its queue is full.
        return [[r] for r in ranked]
