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
   draining replicas last. Serve's own rank walk then picks, among equally
   loaded replicas, the one with the fewest ongoing requests (open sockets),
   probed or cached by Serve, so a burst of new sockets still spreads while
   the generation counts are a period stale; ties are broken at random.
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


def load_of(stats: dict[str, Any] | None) -> tuple[int, float]:
    """Sort key for a replica's routing stats: (draining, live generations + KV use). Pure; missing stats sort as idle."""
    stats = stats or {}
    draining = 1 if stats.get("draining") else 0
    live = float(stats.get("live_generations", 0) or 0)
    kv = float(stats.get("kv_used_fraction", 0.0) or 0.0)
    return draining, live + kv


class RtwsRouter(RequestRouter):  # type: ignore[misc]
    """Affinity by ``rtws.replica.<id>``, else least live generations; see the module docstring."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            key = affinity_key(pending_request.metadata.session_id or "")
            if key is not None:
                pinned = [r for r in candidate_replicas if r.replica_id.unique_id == key]
                if pinned:
                    return [pinned]
        ranked: dict[tuple[int, float], list[RunningReplica]] = {}
        for r in candidate_replicas:
            ranked.setdefault(load_of(r.routing_stats), []).append(r)
        ranks = [ranked[k] for k in sorted(ranked)]
        for group in ranks:  # Serve takes the first of equally short queues: shuffle so ties spread
            random.shuffle(group)
        return ranks
