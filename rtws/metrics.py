"""Prometheus metrics: a :class:`~rtws.hooks.Hooks` implementation, an engine step observer, ``GET /metrics``.

Everything lives in the app's own ``CollectorRegistry`` (never the process
global one), so several apps in one process do not collide. Names start with
``rtws_``; times are in seconds (Prometheus convention) with buckets from 1 ms
to 60 s. Labels are bounded: model, version, transport, reason, code; never a
session or client.

What is measured where:

- Request latencies come from the sessions and HTTP handlers through the
  hooks: time to first token is from the request's arrival to its first text
  frame being written to the socket; end-to-end to its ``done``; queue time is
  arrival to admission into the running batch (engine clock).
- Inter-token latency is measured on the engine thread by the step observer:
  for each generation decoded in a step, the time since the step that produced
  its previous token. Steps in which a generation sits paused for
  backpressure are not counted (the first token after a pause starts afresh),
  so the histogram shows the engine's pace, not a slow reader's.
- Gauges (running, waiting, paused, KV slots, connections, sessions, versions)
  are read from the engines and the app when ``/metrics`` is scraped.
"""

from __future__ import annotations

import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .hooks import GenerationRecord, Hooks
from .http.asgi import Receive, Scope, Send, send_bytes
from .logs import GenerationLog

if TYPE_CHECKING:
    from .app import App
    from .engine import Engine
    from .generation import TokenEvent
    from .scheduler import StepPlan

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2,
                0.5, 1.0, 2.0, 5.0, 10.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def hooks_for(app: App) -> Hooks:
    """The app's observation hooks (pass as ``App(hooks=hooks_for)``; models take the step observer).

    Always: one JSON log line per finished generation (:class:`~rtws.logs.GenerationLog`).
    With ``config.enable_metrics``: :class:`MetricsHooks`, whose ``GET /metrics`` :func:`mount` registers.
    """
    return MetricsHooks(app) if app.config.enable_metrics else GenerationLog()


def mount(app: App) -> None:
    """``GET /metrics`` when the app's hooks are :class:`MetricsHooks` (else ``/metrics`` is 404)."""
    if isinstance(app.hooks, MetricsHooks):
        app.route("GET", "/metrics", app.hooks.handle)


class _Hist:
    """A histogram updated from engine threads: one lock, weighted observations, exported by a collector."""

    __slots__ = ("bounds", "counts", "total", "lock")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float, n: int = 1) -> None:
        i = bisect_left(self.bounds, value)  # first bucket whose upper bound is >= value
        with self.lock:
            self.counts[i] += n
            self.total += value * n

    def buckets(self) -> tuple[list[tuple[str, float]], float]:
        with self.lock:
            counts, total = list(self.counts), self.total
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, c in zip(self.bounds, counts):
            acc += c
            out.append((_le(bound), acc))
        out.append(("+Inf", acc + counts[-1]))
        return out, total


def _le(bound: float) -> str:
    return repr(float(bound))


class StepMetrics:
    """The engine :class:`~rtws.engine.StepObserver`: step time, decode batch size, inter-token latency.

    Called on each engine's thread. Per-engine state (when each generation got
    its last token) is keyed weakly by engine, so a retired engine leaves
    nothing behind; histograms are per model name and survive swaps.
    """

    def __init__(self) -> None:
        self._last: weakref.WeakKeyDictionary[Any, dict[int, float]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.itl: dict[str, _Hist] = {}
        self.step: dict[str, _Hist] = {}
        self.batch: dict[str, _Hist] = {}

    def _hists(self, model: str) -> tuple[_Hist, _Hist, _Hist]:
        itl = self.itl.get(model)
        if itl is None:
            with self._lock:
                if model not in self.itl:
                    self.step[model] = _Hist(STEP_BUCKETS)
                    self.batch[model] = _Hist(BATCH_BUCKETS)
                    self.itl[model] = _Hist(STEP_BUCKETS)
            itl = self.itl[model]
        return itl, self.step[model], self.batch[model]

    def on_step(self, engine: Engine, plan: StepPlan, seconds: float, events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        itl, step, batch = self._hists(engine.name)
        step.observe(seconds)
        if plan.decode:
            batch.observe(len(plan.decode))
        last = self._last.get(engine)
        if last is None:
            with self._lock:
                last = self._last.setdefault(engine, {})
        failed = any(ev.finish == "error" for ev in events)
        # Generations not decoded this step (finished, cancelled, paused) drop out: a paused one restarts
        # its clock at its next token, so reader stalls do not count as inter-token latency.
        fresh: dict[int, float] = {}
        groups: dict[float, int] = {}
        for seq in plan.decode:
            t = last.get(seq.rid)
            if t is not None:
                groups[t] = groups.get(t, 0) + 1
            fresh[seq.rid] = now
        for chunk in plan.prefill:
            if chunk.is_last:
                fresh[chunk.seq.rid] = now
        if failed:
            fresh.clear()
        else:
            for t, n in groups.items():
                itl.observe(now - t, n)
        last.clear()
        last.update(fresh)

    def families(self) -> Iterator[Metric]:
        for name, doc, hists in (
            ("rtws_inter_token_latency_seconds", "Time between successive tokens of a generation (engine)",
             self.itl),
            ("rtws_engine_step_seconds", "Duration of one engine step (prefill chunks + one decode token each)",
             self.step),
            ("rtws_decode_batch_size", "Generations decoded in one engine step", self.batch),
        ):
            fam = HistogramMetricFamily(name, doc, labels=["model"])
            for model, h in list(hists.items()):
                buckets, total = h.buckets()
                fam.add_metric([model], buckets, sum_value=total)
            yield fam


class _AppCollector:
    """Gauges read from the app at scrape time, plus the step observer's histograms."""

    def __init__(self, app: App, hooks: MetricsHooks) -> None:
        self.app = app
        self.hooks = hooks

    def describe(self) -> list[Metric]:
        return []  # no describe: the names are only known at collect time

    def collect(self) -> Iterator[Metric]:
        app = self.app
        engine_gauges = {
            "running": GaugeMetricFamily("rtws_requests_running", "Generations admitted to the batch",
                                         labels=["model", "version"]),
            "waiting": GaugeMetricFamily("rtws_requests_waiting", "Generations queued for admission",
                                         labels=["model", "version"]),
            "paused": GaugeMetricFamily("rtws_requests_paused", "Running generations paused for backpressure",
                                        labels=["model", "version"]),
            "slots_in_use": GaugeMetricFamily("rtws_kv_slots_in_use", "KV-cache slots held",
                                              labels=["model", "version"]),
            "num_slots": GaugeMetricFamily("rtws_kv_slots", "KV-cache slots in total", labels=["model", "version"]),
        }
        steps = CounterMetricFamily("rtws_engine_steps", "Engine steps run", labels=["model", "version"])
        step_errors = CounterMetricFamily("rtws_engine_step_errors", "Engine steps that raised",
                                          labels=["model", "version"])
        versions = GaugeMetricFamily("rtws_model_version", "1 for every loaded version, by state",
                                     labels=["model", "version", "status"])
        totals: dict[tuple[str, str], dict[str, float]] = {}
        states: dict[tuple[str, str, str], int] = {}
        for st in app.registry.served_versions():
            if st.served is None:
                continue
            s = st.served.engine.stats()
            row = totals.setdefault((st.name, st.version), dict.fromkeys(
                (*engine_gauges, "steps", "step_errors"), 0.0))
            for key in (*engine_gauges, "steps", "step_errors"):
                row[key] += getattr(s, key)
            states[(st.name, st.version, st.state)] = 1
        for (model, version), row in totals.items():
            for key, fam in engine_gauges.items():
                fam.add_metric([model, version], row[key])
            steps.add_metric([model, version], row["steps"])
            step_errors.add_metric([model, version], row["step_errors"])
        for labels, v in states.items():
            versions.add_metric(list(labels), v)
        yield from engine_gauges.values()
        yield steps
        yield step_errors
        yield versions
        yield from kv_cache_families(app)
        conns = GaugeMetricFamily("rtws_connections", "Open WebSockets and HTTP streams", labels=["transport"])
        realtime = sum(1 for c in app.connections if getattr(c.session, "transport", "ws") == "realtime")
        conns.add_metric(["ws"], len(app.connections) - realtime)
        conns.add_metric(["realtime"], realtime)
        conns.add_metric(["http"], app.num_http_streams)
        yield conns
        sessions = GaugeMetricFamily("rtws_sessions", "Authenticated WebSocket sessions")
        sessions.add_metric([], sum(1 for c in app.connections if c.session.authenticated))
        yield sessions
        live = GaugeMetricFamily("rtws_live_generations", "Generations not yet done, all transports")
        live.add_metric([], app.live_generations())
        yield live
        frames = CounterMetricFamily("rtws_frames_sent", "Frames written to WebSockets")
        frames.add_metric([], self.hooks.num_frames)
        yield frames
        nbytes = CounterMetricFamily("rtws_sent_bytes", "Bytes of frames written to WebSockets")
        nbytes.add_metric([], self.hooks.num_bytes)
        yield nbytes
        held = GaugeMetricFamily("rtws_sessions_held", "Sessions held without a socket, waiting for a resume")
        held.add_metric([], app.sessions.num_held)
        yield held
        yield from self.hooks.steps.families()


def kv_cache_families(app: App) -> Iterator[Metric]:
    """KV block pool gauges and prefix-cache / preemption counters per model version (names mirror vLLM's
    ``kv_cache_usage_perc``, ``num_preemptions``, ``prefix_cache_queries`` / ``prefix_cache_hits``, in tokens)."""
    labels = ["model", "version"]
    gauges = {
        "kv_blocks": GaugeMetricFamily("rtws_kv_blocks", "KV cache blocks in the pool", labels=labels),
        "kv_blocks_used": GaugeMetricFamily("rtws_kv_blocks_used", "KV cache blocks held by live sequences",
                                            labels=labels),
        "kv_blocks_free": GaugeMetricFamily("rtws_kv_blocks_free", "KV cache blocks allocatable (free or cached "
                                            "and unreferenced)", labels=labels),
        "kv_blocks_cached": GaugeMetricFamily("rtws_kv_blocks_cached", "KV cache blocks indexed by the prefix "
                                              "cache", labels=labels),
        "kv_usage": GaugeMetricFamily("rtws_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)",
                                      labels=labels),
    }
    counters = {
        "preemptions": CounterMetricFamily("rtws_num_preemptions", "Sequences preempted (recomputed later) "
                                           "because the KV pool ran out", labels=labels),
        "prefix_cache_queries": CounterMetricFamily("rtws_prefix_cache_queries", "Prompt tokens looked up in the "
                                                    "prefix cache", labels=labels),
        "prefix_cache_hits": CounterMetricFamily("rtws_prefix_cache_hits", "Prompt tokens served from the prefix "
                                                 "cache", labels=labels),
        "elastic_steps": CounterMetricFamily("rtws_engine_elastic_steps", "Engine steps that also used the event "
                                             "loop's idle core (elastic threads)", labels=labels),
    }
    for st in app.registry.served_versions():
        if st.served is None:
            continue
        s = st.served.engine.stats()
        for key, gauge in gauges.items():
            gauge.add_metric([st.name, st.version], float(getattr(s, key, 0)))
        for key, counter in counters.items():
            counter.add_metric([st.name, st.version], float(getattr(s, key, 0)))
    yield from gauges.values()
    yield from counters.values()


class MetricsHooks(GenerationLog):
    """Prometheus counters and histograms fed by the hooks (and, by inheritance, the generation log)."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.registry = CollectorRegistry()
        r = self.registry
        self.steps = StepMetrics()
        self.step_observer = self.steps
        self.ttft = Histogram("rtws_time_to_first_token_seconds",
                              "Request arrival to its first text written to the client",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("rtws_request_duration_seconds", "Request arrival to its done (any reason)",
                             ["model", "transport"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("rtws_queue_time_seconds", "Request arrival to admission into the batch",
                               ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.started = Counter("rtws_generations_started", "Generations accepted", ["model", "transport"],
                               registry=r)
        self.finished = Counter("rtws_generations", "Generations finished, by reason "
                                "(stop, length, cancelled, timeout, error)",
                                ["model", "version", "transport", "reason"], registry=r)
        self.prompt_tokens = Counter("rtws_prompt_tokens", "Prompt tokens of finished generations", ["model"],
                                     registry=r)
        self.tokens = Counter("rtws_generated_tokens", "Completion tokens sent (sum of usage)", ["model"],
                              registry=r)
        self.rejected_total = Counter("rtws_rejected", "Requests, frames or connections refused, by code "
                                      "(rate_limited, unauthorized, overloaded, ...)", ["code"], registry=r)
        self.pauses = Counter("rtws_backpressure_pauses", "Sessions paused for backpressure", ["reason"],
                              registry=r)
        self.num_frames = 0  # plain ints: frame_sent is the hot path, and it runs on the event loop only
        self.num_bytes = 0
        self.opened = Counter("rtws_connections_opened", "WebSockets accepted", registry=r)
        self.resumes = Counter("rtws_resumes", "Held sessions resumed on a new socket", registry=r)
        self.resume_failures = Counter("rtws_resume_failures", "Resume requests refused, by reason "
                                       "(unknown, other_key, expired, resumed, gap, codec, not_first, off, draining)",
                                       ["reason"], registry=r)
        self.replayed = Counter("rtws_replayed_bytes", "Bytes of retained frames replayed on resume", registry=r)
        self.expired = Counter("rtws_sessions_expired", "Held sessions that ended unresumed", registry=r)
        r.register(_AppCollector(app, self))

    # ------------------------------------------------------------------ hooks (event loop)

    def connection(self, delta: int) -> None:
        if delta > 0:
            self.opened.inc(delta)

    def generation_started(self, model: str, transport: str) -> None:
        self.started.labels(model, transport).inc()

    def first_token(self, model: str, ttft_s: float) -> None:
        self.ttft.labels(model).observe(ttft_s)

    def generation_finished(self, rec: GenerationRecord) -> None:
        super().generation_finished(rec)
        self.finished.labels(rec.model, rec.version, rec.transport, rec.reason).inc()
        self.e2e.labels(rec.model, rec.transport).observe(rec.total_s)
        if rec.queue_s is not None:
            self.queue.labels(rec.model).observe(rec.queue_s)
        self.prompt_tokens.labels(rec.model).inc(rec.prompt_tokens)
        if rec.completion_tokens:
            self.tokens.labels(rec.model).inc(rec.completion_tokens)

    def rejected(self, code: str) -> None:
        self.rejected_total.labels(code).inc()

    def frame_sent(self, nbytes: int, tokens: int) -> None:
        self.num_frames += 1
        self.num_bytes += nbytes

    def paused(self, reason: str) -> None:
        self.pauses.labels(reason).inc()

    def resumed(self, nbytes: int) -> None:
        self.resumes.inc()
        self.replayed.inc(nbytes)

    def resume_failed(self, reason: str) -> None:
        self.resume_failures.labels(reason).inc()

    def session_expired(self) -> None:
        self.expired.inc()

    # ------------------------------------------------------------------ GET /metrics

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, self.render(), CONTENT_TYPE_LATEST)
