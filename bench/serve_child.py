"""A real rtws server for the benchmarks, run as a child process: ``python bench/serve_child.py '<json config>'``.

It builds and runs the app exactly as ``rtws serve`` does (``build_app`` +
``Server`` with ``uvicorn_config``); the only additions live in this
process, not in the server's HTTP surface:

* an event-loop lag sampler: a task that asks for a 10 ms sleep and records
  how late it wakes (``time.perf_counter``, since uvloop's ``loop.time()`` is
  cached per loop iteration);
* a control pipe: once listening it prints ``{"event": "ready", "port", "pid"}``
  on stdout, then answers one JSON line per command read from stdin:
  ``lag_reset``, ``lag`` (p50/p99/max since the last reset), ``steps_reset``, ``steps`` (engine step
  durations p50/p99/max and mean rows per step, recorded by a step observer on the engine thread, also per
  GIL switch interval when ``RTWS_BENCH_SWITCH_AB=<seconds>`` makes the server alternate that interval with
  Python's default every 0.5 s), ``stats``
  (connections, engine counters, RSS, bytes held per session: send buffer +
  transport write buffer), ``sessions`` (per-session send state),
  ``touch_kv`` (write the whole KV pool once, so its pages are resident) and ``gc``. Closing stdin stops the server.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import percentile, rss_kib  # noqa: E402


class LagSampler:
    """Measures how late a periodic 10 ms sleep wakes up on the running loop."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        clock = time.perf_counter
        while True:
            t = clock()
            await asyncio.sleep(self.interval)
            self.samples.append(max(0.0, clock() - t - self.interval))

    def report(self) -> dict[str, Any]:
        s = self.samples
        return {"p50": percentile(s, 50), "p99": percentile(s, 99), "max": max(s) if s else float("nan"),
                "samples": len(s)}


class StepSampler:
    """Engine step durations and batch rows, recorded on the engine thread (wraps the app's step observer)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.steps: list[tuple[float, int]] = []
        self.prefill: list[int] = []  # prompt tokens prefilled in each step (0: a decode-only step)
        self.by_interval: dict[float, list[float]] = {}  # step durations by the GIL switch interval in effect

    def on_step(self, engine: Any, plan: Any, seconds: float, events: Any) -> None:
        if len(self.steps) < 1_000_000:
            self.steps.append((seconds, len(plan.prefill) + len(plan.decode)))
            self.prefill.append(sum(c.end - c.start for c in plan.prefill))
            self.by_interval.setdefault(sys.getswitchinterval(), []).append(seconds)

        if self.inner is not None:
            self.inner.on_step(engine, plan, seconds, events)

    def report(self) -> dict[str, Any]:
        s = list(self.steps)
        dur = [d for d, _ in s]
        pre = list(self.prefill)[:len(s)]
        with_prefill = [d for d, n in zip(dur, pre) if n]
        decode_only = [d for d, n in zip(dur, pre) if not n]
        return {"steps": len(s), "p50": percentile(dur, 50), "p99": percentile(dur, 99),
                "max": max(dur) if dur else float("nan"),
                "rows": sum(r for _, r in s) / len(s) if s else float("nan"),
                "prefill_steps": len(with_prefill), "prefill_tokens": sum(pre),
                "prefill_p50": percentile(with_prefill, 50), "prefill_p99": percentile(with_prefill, 99),
                "decode_p50": percentile(decode_only, 50), "decode_p99": percentile(decode_only, 99)}


class GcPauses:
    """Durations of the interpreter's garbage collections (gc.callbacks), by generation: a collection holds
    the GIL, so it stalls the engine thread and the event loop alike."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._t0 = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif len(self.pauses) < 1_000_000:
            self.pauses.append((int(info.get("generation", -1)), time.perf_counter() - self._t0))

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for g in (0, 1, 2):
            d = [x for gen, x in self.pauses if gen == g]
            out[str(g)] = {"n": len(d), "total": sum(d), "max": max(d) if d else 0.0}
        return out


def transport_buffered(conn: Any) -> int:
    """Bytes waiting in the connection's transport write buffer (uvicorn's protocol owns the ASGI ``send``)."""
    transport = getattr(getattr(conn.send, "__self__", None), "transport", None)
    try:
        return int(transport.get_write_buffer_size()) if transport is not None else 0
    except Exception:  # closed transport
        return 0


def main() -> int:
    from rtws.config import ServerConfig
    from rtws.logs import setup_logging
    from rtws.server import Server, build_app, set_threads, uvicorn_config

    raw = json.loads(sys.argv[1])
    # JSON has no tuples: list values are the config's tuple fields (api_keys, allowed_origins, ...)
    cfg = ServerConfig.from_sources({k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}, env={})
    setup_logging(cfg.log_level)
    import torch

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    set_threads(cfg, device)  # the thread defaults `rtws serve` applies
    app = build_app(cfg)
    lag = LagSampler()
    steps = StepSampler(app.hooks.step_observer)
    gcp = GcPauses()
    app.hooks.step_observer = steps  # read when a model is loaded (at startup)

    async def start_lag() -> None:
        lag.start()
        ab = os.environ.get("RTWS_BENCH_SWITCH_AB")  # "0.0005": alternate sys.setswitchinterval with the default
        if ab:
            async def alternate() -> None:
                default = sys.getswitchinterval()
                while True:
                    for v in (default, float(ab)):
                        sys.setswitchinterval(v)
                        await asyncio.sleep(0.5)

            asyncio.get_running_loop().create_task(alternate())

    app.on_startup.append(start_lag)
    server = Server(uvicorn_config(app, cfg), app)
    out = sys.stdout

    def answer(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    async def handle(cmd: str) -> dict[str, Any]:
        if cmd == "lag_reset":
            lag.samples = []
            return {"ok": True}
        if cmd == "lag":
            return lag.report()
        if cmd == "steps_reset":
            steps.steps = []
            steps.prefill = []
            gcp.pauses = []
            steps.by_interval = {}
            return {"ok": True}
        if cmd == "steps":
            r = steps.report()
            r["gc"] = gcp.report()
            r["by_switch_interval"] = {str(k): {"steps": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99)}
                                       for k, v in steps.by_interval.items()}
            return r
        if cmd == "gc":
            gc.collect()
            return {"rss_kib": rss_kib(os.getpid())}
        if cmd == "stats":
            models = {}
            for name in app.registry.names():
                served = app.registry.get(name)
                if served is not None:
                    st = served.engine.stats()
                    models[name] = {"running": st.running, "waiting": st.waiting, "paused": st.paused,
                                    "steps": st.steps, "tokens": st.tokens_generated, "step_errors": st.step_errors}
            sessions = [c.session for c in app.connections]
            held = [c.session.buffered + transport_buffered(c) for c in app.connections]
            return {"connections": len(app.connections), "rss_kib": rss_kib(os.getpid()),
                    "held_bytes": sum(held), "max_held_bytes": max(held, default=0),
                    "paused_sessions": sum(1 for s in sessions if s.paused),
                    "pauses": sum(s.num_pauses for s in sessions),
                    "buffered_bytes": sum(s.buffered for s in sessions),
                    "max_buffered_bytes": max((s.max_buffered for s in sessions), default=0),
                    "models": models, "cpu_s": sum(os.times()[:2])}
        if cmd == "touch_kv":
            return await touch_kv()
        if cmd == "sessions":
            now = time.monotonic()
            return {"sessions": [{"frames": c.session.frames_sent, "buffered": c.session.buffered,
                                  "max_buffered": c.session.max_buffered, "paused": c.session.paused,
                                  "live": len(c.session.live),
                                  "blocked_s": None if c.session.send_started is None else now - c.session.send_started}
                                 for c in app.connections]}
        return {"error": f"unknown command {cmd!r}"}

    async def touch_kv() -> dict[str, Any]:
        """Make every model's KV pool resident (``ModelRunner.prefault_kv``, in a worker thread) before any
        traffic: the pool is allocated with ``torch.empty`` and its pages become resident only when first
        written, which would otherwise show up in RSS deltas meant to measure sessions and buffers (and as page
        faults inside engine steps)."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        touched = 0
        for name in app.registry.names():
            served = app.registry.get(name)
            if served is None:
                continue
            runner: Any = served.engine.runner  # rtws.runner.ModelRunner (the Engine's Runner protocol is smaller)
            touched += await loop.run_in_executor(None, runner.prefault_kv)
        return {"touched_bytes": touched, "seconds": time.perf_counter() - t0, "rss_kib": rss_kib(os.getpid())}

    def control() -> None:
        server.ready.wait()
        loop = server._loop
        assert loop is not None
        answer({"event": "ready", "port": server.port, "pid": os.getpid()})
        for line in sys.stdin:
            cmd = line.strip()
            if not cmd:
                continue
            try:
                answer(asyncio.run_coroutine_threadsafe(handle(cmd), loop).result())  # the parent times out
            except Exception as exc:  # the bench reads the error; the server keeps running
                answer({"error": f"{type(exc).__name__}: {exc}"})
        server.should_exit = True

    threading.Thread(target=control, name="bench-control", daemon=True).start()
    server.run()
    if not server.started:
        answer({"event": "exited", "started": False})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
