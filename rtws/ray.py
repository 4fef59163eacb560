"""Scale-out on Ray Serve: N rtws engine replicas behind Serve's one HTTP/WebSocket endpoint.

Optional extra: ``pip install rtws[ray]``. Two ways to start it:

    rtws serve-ray --replicas 2 --model ./my-model          # starts (or joins) Ray and Serve, blocks
    serve run rtws.ray:app replicas=2 model=./my-model      # Serve's CLI; rtws.ray:app is a builder

Each replica is one :class:`rtws.app.App` (one engine per model), built from
the same :class:`~rtws.config.ServerConfig` fields that ``rtws serve`` takes.
What this module adds around Serve (docs/scale-out.md explains each):

- **Deployment options** from the config (:func:`deployment_options`): one
  replica per engine, ``num_gpus=1`` where CUDA is used,
  ``max_ongoing_requests`` above ``max_connections`` (a WebSocket is one Serve
  request for its whole life, so Serve's default of 5 would queue the 6th
  socket), a bounded Serve queue, and autoscaling on live generations.
- **Identity:** every replica announces its id in ``ready.replica`` and in the
  ``rtws_replica_info`` metric.
- **Flow control:** ``require_ack`` is on unless set explicitly
  (:func:`replica_config`): Serve's ``send`` never blocks, so only the
  acknowledgement window bounds what a slow reader makes a replica send.
- **Routing** (:mod:`rtws.ray_router`): affinity by the ``rtws.replica.<id>``
  subprotocol, else the replica with the fewest live generations.
- **Drain** on scale-down and redeploy: ``App.drain()`` runs when Serve starts
  a replica's graceful shutdown (:func:`install_drain_hook`, the one private
  Ray hook), so accepted generations get their ``done`` and sockets close 1001.
- **Loopback clusters** (:func:`start_local_cluster`): Ray listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from . import ray_env
from .app import App
from .config import FIELD_NAMES, ServerConfig, field_type, parse_value
from .transport import PACING_SCOPE_KEY

log = logging.getLogger("rtws.ray")

ROUTER_CLASS = "rtws.ray_router.RtwsRouter"
POLICY_FUNCTION = "rtws.ray:autoscale_on_live_generations"


@dataclass(frozen=True, slots=True)
class RayOptions:
    """How the Serve deployment is shaped. Defaults are the documented ones (docs/scale-out.md)."""

    name: str = "rtws"
    replicas: int = 1
    # Autoscaling is on when max_replicas > replicas (or min_replicas is given): target is live
    # generations per replica, default 3/4 of the KV slots, so a replica is added before its batch is full.
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_live_generations: float | None = None
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0
    num_cpus: float = 1.0
    num_gpus: float | None = None  # None: 1 where the config uses CUDA (or "auto" on a cluster with GPUs), else 0
    max_queued_requests: int = 64  # Serve's own queue in front of the replicas, bounded
    routing_stats_period_s: float = 1.0
    graceful_shutdown_margin_s: float = 10.0  # on top of drain_timeout_s before Serve kills a replica
    # Per-socket frame pacing (0: off): a socket's writer sends at most one frame per this many ms, so tokens
    # coalesce into fewer frames through the proxy (bench/ray_bench.py measures the trade: tok/s against ITL).
    frame_interval_ms: float = 0.0
    # What carries client traffic to the replicas (docs/scale-out.md, "Ingress"): "proxy" (Serve's Python proxy,
    # with rtws's router: affinity and least-loaded placement), "haproxy" (Serve's HAProxy ingress: each replica
    # serves its own sockets), or "auto" (HAProxy for a local cluster with one fixed replica, else proxy).
    # The cluster's environment decides (rtws.ray_env.cluster_env, set before Ray starts); "auto" follows it.
    ingress: str = "auto"

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas: must be >= 1 (got {self.replicas})")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.replicas:
            raise ValueError(f"min_replicas: must be in 0..replicas (got {self.min_replicas})")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas: must be >= replicas (got {self.max_replicas})")
        if self.target_live_generations is not None and self.target_live_generations <= 0:
            raise ValueError("target_live_generations: must be > 0")
        if self.num_cpus < 0 or (self.num_gpus is not None and self.num_gpus < 0):
            raise ValueError("num_cpus/num_gpus: must be >= 0")
        if self.frame_interval_ms < 0:
            raise ValueError("frame_interval_ms: must be >= 0")
        if self.ingress not in ray_env.INGRESSES:
            raise ValueError(f"ingress: one of {', '.join(ray_env.INGRESSES)} (got {self.ingress!r})")
        if self.max_queued_requests < 1 or self.routing_stats_period_s <= 0:
            raise ValueError("max_queued_requests and routing_stats_period_s must be positive")

    @property
    def autoscaling(self) -> bool:
        return ray_env.autoscaling(self.replicas, self.min_replicas, self.max_replicas)


OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(RayOptions))


# ---------------------------------------------------------------------- cluster


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def start_local_cluster(*, num_cpus: int | None = None, num_gpus: int | None = None, loopback: bool = True,
                        env: Mapping[str, str] | None = None, ingress: str = "proxy") -> None:
    """Start a single-node Ray on this machine (listening on 127.0.0.1 only when ``loopback``).

    Ray's processes inherit this process's environment, and Ray reads the
    loopback switch when it is imported: call :func:`rtws.ray_env.apply` before
    the first ``import ray`` (``rtws serve-ray`` does). Raises ``RuntimeError``,
    with the cluster stopped again, if Ray did not come up on 127.0.0.1.
    ``env`` adds variables (e.g. ``PYTHONPATH``) for the replicas' workers.
    ``ingress="haproxy"``: Serve's HAProxy ingress (its flags too must be set
    before ``import ray``: ``rtws.ray_env.apply(loopback, ingress="haproxy")``).
    """
    ray_env.apply(loopback, ingress=ingress)
    runtime_env = {"env_vars": dict(env)} if env else None
    kwargs: dict[str, Any] = dict(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                                  log_to_driver=False, runtime_env=runtime_env)
    if loopback:
        kwargs["_node_ip_address"] = "127.0.0.1"
    ray.init(**kwargs)
    if loopback and ray.util.get_node_ip_address() != "127.0.0.1":
        address = ray.util.get_node_ip_address()
        ray.shutdown()
        raise RuntimeError(f"Ray started on {address}, not 127.0.0.1: set {ray_env.LOCAL_ONLY_ENV}=0 before "
                           "importing ray (rtws.ray_env.apply)")


# ---------------------------------------------------------------------- deployment


def resolve_num_gpus(config: ServerConfig, options: RayOptions) -> float:
    """GPUs per replica: the explicit option, else 1 where CUDA is used (``auto`` on a cluster with GPUs), else 0."""
    if options.num_gpus is not None:
        return options.num_gpus
    if config.device.startswith("cuda"):
        return 1.0
    if config.device == "auto" and ray.is_initialized():
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return 0.0


def replica_config(config: ServerConfig, num_gpus: float) -> ServerConfig:
    """The config one replica runs: Ray shows a replica only its own GPU (``cuda:N`` becomes ``cuda``), and
    ``require_ack`` is on unless set explicitly: Serve's ``send`` never blocks, so socket backpressure
    never reaches the session and only acknowledgements bound what a slow reader makes a replica queue."""
    if config.require_ack is None:
        config = config.replace(require_ack=True)
    if num_gpus >= 1 and config.device.startswith("cuda"):
        return config.replace(device="cuda")
    return config


def deployment_options(config: ServerConfig, options: RayOptions, num_gpus: float = 0.0) -> dict[str, Any]:
    """Keyword arguments for ``serve.deployment`` (documented in docs/scale-out.md)."""
    opts: dict[str, Any] = dict(
        name=options.name,
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": num_gpus},
        # A WebSocket is one request for its whole life: leave room above max_connections so that rtws
        # itself answers the (max_connections+1)th socket with `overloaded` instead of Serve queueing it.
        max_ongoing_requests=config.max_connections + 16,
        max_queued_requests=options.max_queued_requests,
        graceful_shutdown_timeout_s=config.drain_timeout_s + options.graceful_shutdown_margin_s,
        graceful_shutdown_wait_loop_s=0.5,
    )
    if not ray_env.haproxy_ingress():
        # Behind HAProxy the connection never passes a Serve router (HAProxy balances by least connections),
        # and Serve refuses a custom one there.
        opts["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTER_CLASS,
            request_routing_stats_period_s=options.routing_stats_period_s,
            request_routing_stats_timeout_s=max(options.routing_stats_period_s, 5.0),
        )
    if options.autoscaling:
        target = options.target_live_generations or max(1.0, 0.75 * config.num_slots)
        opts["autoscaling_config"] = AutoscalingConfig(
            min_replicas=options.min_replicas if options.min_replicas is not None else 1,
            initial_replicas=options.replicas,
            max_replicas=options.max_replicas if options.max_replicas is not None else options.replicas,
            # Read by autoscale_on_live_generations as "live generations per replica".
            target_ongoing_requests=target,
            upscale_delay_s=options.upscale_delay_s,
            downscale_delay_s=options.downscale_delay_s,
            policy=AutoscalingPolicy(policy_function=POLICY_FUNCTION),
        )
    else:
        opts["num_replicas"] = options.replicas
    return opts


def autoscale_on_live_generations(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve autoscaling policy: replicas = live generations / target per replica.

    The target is the deployment's ``target_ongoing_requests`` (set from
    ``RayOptions.target_live_generations``). Live generations come from each
    replica's ``record_autoscaling_stats``; before the first report it falls back
    to Serve's ongoing requests (sockets). Serve applies min/max, delays and
    scaling factors around the returned number.
    """
    metrics = ctx.aggregated_metrics or {}
    live = metrics.get("live_generations") or {}
    total = float(sum(live.values())) if live else float(ctx.total_num_requests)
    target = float(ctx.config.get_target_ongoing_requests() or 1.0)
    return total / target, {}


def build_application(config: ServerConfig, options: RayOptions | None = None) -> Any:
    """The Serve application (``serve.run(build_application(cfg))``): one ``RtwsReplica`` deployment."""
    options = options or RayOptions()
    check_ingress(options)
    num_gpus = resolve_num_gpus(config, options)
    ingress = serve.ingress()(RtwsReplica)
    deployment = serve.deployment(ingress, **deployment_options(config, options, num_gpus))
    return deployment.bind(_config_dict(replica_config(config, num_gpus)), options.frame_interval_ms)


def check_ingress(options: RayOptions) -> str:
    """The ingress this process's cluster environment runs; ``ValueError`` if ``options.ingress`` asks for the other.

    Serve reads its ingress flags when Ray is imported and when the cluster starts, so a deployment cannot
    choose it: ``rtws serve-ray`` sets them before importing Ray (``rtws.ray_env.apply(..., ingress=...)``); for
    ``ray start`` / ``serve run`` they go in the nodes' environment (docs/scale-out.md).
    """
    running = "haproxy" if ray_env.haproxy_ingress() else "proxy"
    if options.ingress not in ("auto", running):
        raise ValueError(f"ingress {options.ingress!r} asked for, but this cluster's environment runs {running!r} "
                         f"({ray_env.DIRECT_INGRESS_ENV} and {ray_env.HAPROXY_ENV} must be set before Ray starts)")
    return running


def app(args: dict[str, str]) -> Any:
    """Serve application builder for ``serve run rtws.ray:app key=value ...``.

    Keys are ``ServerConfig`` fields (``model=...``, ``num_slots=32``) and
    ``RayOptions`` fields (``replicas=2``); ``RTWS_*`` variables apply under them.
    """
    config_args: dict[str, Any] = {}
    option_args: dict[str, Any] = {}
    option_types = {f.name: f.type for f in dataclasses.fields(RayOptions)}
    for key, raw in args.items():
        if key in FIELD_NAMES:
            config_args[key] = parse_value(key, field_type(key), str(raw))
        elif key in OPTION_NAMES:
            option_args[key] = _parse_option(key, str(option_types[key]), str(raw))
        else:
            raise ValueError(f"{key}: unknown rtws.ray argument (a ServerConfig or RayOptions field)")
    return build_application(ServerConfig.from_sources(config_args), RayOptions(**option_args))


def _parse_option(key: str, annotation: str, raw: str) -> Any:
    text = raw.strip()
    if "None" in annotation and text.lower() in ("", "none"):
        return None
    try:
        if annotation.startswith("int"):
            return int(text)
        if annotation.startswith("float"):
            return float(text)
    except ValueError:
        raise ValueError(f"{key}: cannot parse {raw!r}") from None
    return text


def _config_dict(config: ServerConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


# ---------------------------------------------------------------------- the replica


class RtwsReplica:
    """One Serve replica: an rtws :class:`App` (built like ``rtws serve`` builds it) plus Serve's hooks.

    Wrapped by ``serve.ingress()`` in :func:`build_application`; Serve calls
    ``__serve_build_asgi_app__`` once and then runs the app's ASGI lifespan.
    """

    def __init__(self, config: dict[str, Any], frame_interval_ms: float = 0.0) -> None:
        from .logs import setup_logging
        from .server import build_app

        ctx = serve.get_replica_context()
        self.replica_id: str = ctx.replica_tag
        cfg = ServerConfig(**{**config, "replica_id": self.replica_id})
        setup_logging(cfg.log_level)
        self.config = cfg
        self.rtws_app: App = build_app(cfg)
        self.frame_interval_s = frame_interval_ms / 1000.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.rtws_app.on_startup.append(self._remember_loop)
        install_replica_metrics(self.rtws_app, {"replica": self.replica_id, "deployment": ctx.deployment,
                                           "application": ctx.app_name, "node": ray.get_runtime_context().get_node_id()})
        install_drain_hook()
        if ray.util.get_node_ip_address() == "127.0.0.1":
            bind_replica_grpc_to_loopback()

    async def _remember_loop(self) -> None:
        self._loop = asyncio.get_running_loop()

    def __serve_build_asgi_app__(self) -> Any:
        if self.frame_interval_s > 0:
            return FramePacing(self.rtws_app, self.frame_interval_s)
        return self.rtws_app

    async def record_routing_stats(self) -> dict[str, Any]:
        """Read by :class:`rtws.ray_router.RtwsRouter` (every ``routing_stats_period_s``)."""
        return replica_load(self.rtws_app)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Read by :func:`autoscale_on_live_generations`."""
        load = replica_load(self.rtws_app)
        return {"live_generations": float(load["live_generations"]), "connections": float(load["connections"])}

    async def check_health(self) -> None:
        if self.rtws_app.started and not self.rtws_app.registry.models():
            raise RuntimeError("no model loaded")

    async def rtws_drain(self) -> None:
        """Drain the app on its own loop (Serve may call this from another thread's loop). Idempotent."""
        loop = self._loop
        if loop is None or self.rtws_app.draining:
            return
        fut = asyncio.run_coroutine_threadsafe(self.rtws_app.drain(), loop)
        await asyncio.wrap_future(fut)


class FramePacing:
    """ASGI wrapper: each WebSocket sends at most one frame per ``interval_s``.

    Behind Serve's proxy every ``websocket.send`` costs the proxy the same
    whatever it carries, and Serve's ``send`` never blocks, so without this the
    session writes one frame per token. While the writer waits here, the
    session coalesces the generation's next tokens into its next ``delta``
    (rtws.session's send buffer), so frames carry several tokens under load.
    Costs up to ``interval_s`` of added latency per frame. HTTP passes through.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], interval_s: float) -> None:
        self.app = app
        self.interval_s = interval_s

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Awaitable[Any]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        interval = self.interval_s
        last = -interval
        # Seconds this wrapper has held sends, read by the session (PACING_SCOPE_KEY): time spent pacing is not
        # time blocked on the reader, which the watchdog's slow-reader rule counts.
        slept = [0.0]

        async def paced(message: dict[str, Any]) -> None:
            nonlocal last
            if message["type"] == "websocket.send":
                wait = last + interval - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    slept[0] += wait
                last = loop.time()
            await send(message)

        await self.app({**scope, PACING_SCOPE_KEY: lambda: slept[0]}, receive, paced)


def replica_load(app: App) -> dict[str, Any]:
    """What a replica reports to the router: live generations, sockets, KV use, draining. Call on the app's loop."""
    used = total = 0
    for served in app.registry.models():
        stats = served.engine.stats()
        used += stats.slots_in_use
        total += stats.num_slots
    return {"live_generations": app.live_generations(), "connections": len(app.connections),
            "kv_used_fraction": round(used / total, 4) if total else 0.0, "draining": app.draining}


class _ReplicaInfo:
    """``rtws_replica_info{replica, deployment, application, node} 1``: which replica answered a scrape."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("rtws_replica_info", "The Ray Serve replica that served this scrape",
                              labels=list(self.labels))
        g.add_metric(list(self.labels.values()), 1)
        yield g


def install_replica_metrics(app: App, labels: dict[str, str]) -> None:
    """Add ``rtws_replica_info`` to the app's Prometheus registry (when metrics are enabled)."""
    registry = getattr(app.hooks, "registry", None)
    if registry is not None:
        registry.register(_ReplicaInfo(labels))


# ---------------------------------------------------------------------- the one private Ray hook

DrainFn = Callable[..., Awaitable[Any]]


def install_drain_hook() -> None:
    """Make Serve's replica shutdown call ``rtws_drain()`` on the user object before it waits for requests.

    The one private Ray API rtws uses (Ray 2.60, ``ray.serve._private.replica``):
    Serve has no public pre-shutdown hook. A replica's graceful shutdown
    (``Replica._perform_graceful_shutdown``) first waits in
    ``Replica._drain_ongoing_requests`` until no request is ongoing, and only
    then runs the user's ``__del__`` and the ASGI lifespan shutdown (behind Serve's
    HAProxy ingress, ``Replica._drain_behind_haproxy`` first holds the listener
    open for a deregistration window, then calls it; both are wrapped). A WebSocket
    is an ongoing request for its whole life, so without this hook the wait
    lasts until Serve kills the replica (sockets end 1006, generations get no
    ``done``). The wrapper runs the drain first; the original wait then returns
    as soon as the sockets have closed.

    Raises ``RuntimeError`` if Ray changed those names or their shape
    (tests/test_ray.py checks this against the installed Ray). Idempotent.
    """
    from ray.serve._private import replica as replica_module

    cls = getattr(replica_module, "Replica", None)
    original = getattr(cls, "_drain_ongoing_requests", None)
    shutdown = getattr(cls, "_perform_graceful_shutdown", None)
    behind_haproxy = getattr(cls, "_drain_behind_haproxy", None)
    if getattr(original, "__rtws_drain_hook__", False):
        return
    problem = None
    if cls is None or original is None or shutdown is None:
        problem = "Replica._drain_ongoing_requests or Replica._perform_graceful_shutdown is missing"
    elif not inspect.iscoroutinefunction(original):
        problem = "Replica._drain_ongoing_requests is no longer a coroutine function"
    elif "_drain_ongoing_requests" not in inspect.getsource(shutdown):
        problem = "Replica._perform_graceful_shutdown no longer calls _drain_ongoing_requests"
    elif behind_haproxy is not None and not inspect.iscoroutinefunction(behind_haproxy):
        problem = "Replica._drain_behind_haproxy is no longer a coroutine function"
    if problem is not None:
        raise RuntimeError(f"Ray Serve {ray.__version__}: {problem}; rtws cannot drain replicas on scale-down "
                           "(update rtws.ray.install_drain_hook)")

    async def rtws_drain() -> None:
        try:
            servable = serve.get_replica_context().servable_object
        except Exception:  # not initialised yet: nothing of ours to drain
            servable = None
        hook = getattr(servable, "rtws_drain", None)
        if hook is not None:
            try:
                await hook()
            except Exception:
                log.exception("rtws drain failed", extra={"event": "drain_error"})

    def drain_first(wait: Any) -> Any:
        @functools.wraps(wait)
        async def drain_then_wait(self: Any, *args: Any, **kwargs: Any) -> Any:
            await rtws_drain()  # idempotent: the HAProxy drain calls the plain one after its hold
            return await wait(self, *args, **kwargs)

        drain_then_wait.__rtws_drain_hook__ = True  # type: ignore[attr-defined]
        return drain_then_wait

    setattr(cls, "_drain_ongoing_requests", drain_first(original))
    # Behind HAProxy (Serve's HAProxy ingress) the shutdown first holds the listener open for the deregistration
    # window (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S) and only then waits: drain before the hold too.
    if behind_haproxy is not None:
        setattr(cls, "_drain_behind_haproxy", drain_first(behind_haproxy))


def bind_replica_grpc_to_loopback() -> None:
    """On a loopback-only node, keep the replica's inter-deployment gRPC server on 127.0.0.1.

    The second (and last) private Ray name rtws touches: Serve 2.60 starts a gRPC
    server in every replica after the user constructor, on the hard-coded address
    ``[::]:0`` (all interfaces) through ``ray.serve._private.replica.add_port_to_grpc_server``,
    whatever the node's address. It carries requests only with
    ``RAY_SERVE_USE_GRPC_BY_DEFAULT=1``. Called from the replica's constructor, so
    before that server starts; rewrites an all-interfaces address to 127.0.0.1.
    Raises ``RuntimeError`` if Ray renamed it (tests/test_ray.py's loopback test
    also fails if a listener escapes). Idempotent.
    """
    from ray.serve._private import replica as replica_module

    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if original is None:
        raise RuntimeError(f"Ray Serve {ray.__version__}: replica.add_port_to_grpc_server is missing; "
                           "rtws cannot keep replicas on loopback (update rtws.ray.bind_replica_grpc_to_loopback)")
    if getattr(original, "__rtws_loopback__", False):
        return

    @functools.wraps(original)
    def loopback_port(server: Any, address: str, *args: Any, **kwargs: Any) -> Any:
        host, _, port = address.rpartition(":")
        if host in ("[::]", "0.0.0.0", ""):
            address = f"127.0.0.1:{port}"
        return original(server, address, *args, **kwargs)

    loopback_port.__rtws_loopback__ = True  # type: ignore[attr-defined]
    setattr(replica_module, "add_port_to_grpc_server", loopback_port)


# ---------------------------------------------------------------------- rtws serve-ray


def serve_ray(config: ServerConfig, options: RayOptions, address: str | None = None,
              stop: threading.Event | None = None, on_ready: Callable[[], None] | None = None) -> int:
    """Run rtws on Ray Serve until SIGTERM/SIGINT (or ``stop``), then drain and shut down. Returns an exit code.

    ``address``: an existing cluster (``auto`` or ``host:port``); None starts a
    local one, on loopback when ``config.host`` is a loopback address.
    """
    from .logs import setup_logging

    setup_logging(config.log_level)
    started_ray = False
    ingress = check_ingress(options)  # rtws.ray_cli set the ingress flags before importing Ray
    if address is None:
        start_local_cluster(loopback=is_loopback(config.host), ingress=ingress)
        started_ray = True
    else:
        os.environ.setdefault(ray_env.SESSION_HEADER_ENV, ray_env.SESSION_HEADER)
        ray.init(address=address, log_to_driver=False)
    stop = stop or threading.Event()
    # The handlers only set a flag: Event.set() from a handler deadlocks when the signal lands while the main
    # thread holds the Event's lock inside wait() (it did: SIGTERM left `rtws serve-ray` hung).
    signalled: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    if threading.current_thread() is threading.main_thread():
        for sig in previous:
            signal.signal(sig, lambda signum, _frame: signalled.append(signum))
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_application(config, options), name=options.name, route_prefix="/")
        log.info("listening", extra={"event": "listening", "host": config.host, "port": config.port,
                                     "replicas": options.replicas, "ingress": ingress})
        print(f"rtws on Ray Serve: http://{config.host}:{config.port} ({options.replicas} replica"
              f"{'s' if options.replicas != 1 else ''}, {'HAProxy' if ingress == 'haproxy' else 'Serve proxy'} "
              "ingress)", flush=True)
        if on_ready is not None:
            on_ready()
        while not (signalled or stop.is_set()):  # is_set() takes no lock
            time.sleep(0.2)
        log.info("draining", extra={"event": "drain_start"})
        serve.delete(options.name)  # graceful: every replica drains (install_drain_hook)
        serve.shutdown()
        return 0
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if started_ray:
            ray.shutdown()
