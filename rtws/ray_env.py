"""The environment a Ray node needs for rtws. Pure: importing this module does not import Ray.

Ray reads some of these variables when ``ray`` is first imported, so set them
(:func:`apply`) before ``import ray`` in the process that starts the cluster;
Ray's own processes inherit them.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SESSION_HEADER_ENV = "RAY_SERVE_SESSION_ID_HEADER_KEY"
SESSION_HEADER = "sec-websocket-protocol"
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def cluster_env(loopback: bool) -> dict[str, str]:
    """Variables for every Ray node running rtws (``ray start`` or :func:`rtws.ray.start_local_cluster`).

    - ``RAY_SERVE_SESSION_ID_HEADER_KEY=sec-websocket-protocol``: Serve's proxy hands the
      WebSocket subprotocol list to the router as the request's session id (affinity,
      :mod:`rtws.ray_router`). Browsers can set a subprotocol; they cannot set other headers.
    - ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (loopback only): Ray's single-machine mode, where
      the node address is 127.0.0.1, so every Ray server (GCS, raylet, workers, agents) binds to
      loopback instead of the host's address. Read when ``ray`` is imported.
    - ``RAY_USAGE_STATS_ENABLED=0``: no usage report.
    """
    env = {SESSION_HEADER_ENV: SESSION_HEADER, "RAY_USAGE_STATS_ENABLED": "0"}
    if loopback:
        env[LOCAL_ONLY_ENV] = "0"
    return env


def apply(loopback: bool, environ: MutableMapping[str, str] | None = None) -> None:
    """Set :func:`cluster_env` in ``environ`` (default ``os.environ``), keeping values already set."""
    environ = os.environ if environ is None else environ
    for k, v in cluster_env(loopback).items():
        environ.setdefault(k, v)
