"""Load-generator processes for the benchmarks: real WebSocket clients, no torch.

Each worker process runs one asyncio loop (uvloop when available) holding
some connections, and obeys commands from the parent on a queue:

* ``run``: closed loop over a list of requests, ``streams`` in flight per connection;
* ``poisson``: open loop, requests sent at exponential intervals (``rate`` per second);
* ``background``: closed loop, cycling its requests until the parent's stop event;
* ``cancel_probe``: one at a time: start a generation, wait for its first delta, send ``cancel``,
  time until ``done {cancelled}``;
* ``one_each``: every connection starts one generation at once (the sessions bench);
* ``stall``: (raw connections) send generations, then stop reading;
* ``close``: close everything and exit.

Every answer is a plain dict put on the results queue. Times come from
``time.monotonic`` (one clock for all processes on Linux), so the parent can
take the wall time of a phase as the latest end minus the earliest start.

Clients use ``websockets`` with the protocol's msgpack codec, reading frames
in one task per connection and timestamping them as they arrive. Per-token
latency divides the gap between two frames of a stream by the tokens the later
frame carries (the server coalesces tokens when a socket is busy).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import random
import resource
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

from rtws import protocol as p

clock = time.monotonic


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _socket(url: str, rcvbuf: int | None, maxseg: int | None) -> socket.socket:
    """A connected-to-be TCP socket with optional small receive buffer / MSS (set before connect)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if maxseg:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, maxseg)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


# --------------------------------------------------------------------------- per-request accounting


@dataclass(slots=True)
class Req:
    gid: Any
    prompt: str
    max_tokens: int
    sent: float = 0.0
    last: float = 0.0
    first: float | None = None
    tokens: int = 0
    frames: int = 0
    reason: str | None = None
    error: str | None = None
    cancel_sent: float | None = None
    frames_after_cancel: int = 0
    done: asyncio.Future[None] | None = None
    first_token: asyncio.Future[None] | None = None


@dataclass(slots=True)
class Tally:
    """Aggregated measurements of one command in one worker."""

    tokens: int = 0
    frames: int = 0
    messages: int = 0  # WebSocket messages read (a batch message carries several frames)
    requests: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    cancel: list[float] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    t_start: float = float("inf")
    t_end: float = 0.0

    def add(self, r: Req, now: float) -> None:
        self.requests += 1
        self.t_end = max(self.t_end, now)
        if r.error is not None:
            self.errors[r.error] = self.errors.get(r.error, 0) + 1
            return
        if r.reason is not None:
            self.reasons[r.reason] = self.reasons.get(r.reason, 0) + 1
        if r.first is not None:
            self.ttft.append(r.first - r.sent)
        if r.reason != "cancelled":
            self.e2e.append(now - r.sent)

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "frames": self.frames, "messages": self.messages,
                "requests": self.requests, "ttft": self.ttft,
                "itl": self.itl, "e2e": self.e2e, "cancel": self.cancel, "reasons": self.reasons,
                "errors": self.errors, "t_start": self.t_start, "t_end": self.t_end}


class Conn:
    """One WebSocket session (``websockets`` client) with a reader task that timestamps frames."""

    def __init__(self, ws: Any, codec: p.Codec, name: str, ack_every: int | None = None) -> None:
        self.ws = ws
        self.codec = codec
        self.name = name
        # ready.limits.ack_required (rtws.ray): ack every window/8 bytes and at every done, as rtws.client does
        self.ack_every = ack_every
        self.received = 0
        self._unacked = 0
        self.reqs: dict[Any, Req] = {}
        self.tally: Tally | None = None
        self.closed = False
        self._ids = itertools.count()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, url: str, name: str, *, rcvbuf: int | None = None, maxseg: int | None = None,
                   timeout: float = 60.0, batch: bool = False) -> Conn:
        from websockets.asyncio.client import connect

        u = urlsplit(url)
        sock = _socket(url, rcvbuf, maxseg)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (u.hostname, u.port)), timeout)
        ws = await connect(url, sock=sock, subprotocols=[p.SUBPROTOCOL_MSGPACK],  # type: ignore[list-item]
                           compression=None,
                           max_size=None, max_queue=4096, proxy=None, open_timeout=timeout, ping_interval=None,
                           close_timeout=2)
        codec = p.MSGPACK
        while True:
            frame = codec.decode_any(await asyncio.wait_for(ws.recv(), timeout))
            if isinstance(frame, p.Ready):
                break
            if isinstance(frame, p.Error):
                await ws.close()
                raise ConnectionError(f"{frame.code}: {frame.message}")
        if batch and frame.limits.batch:  # opt in to batch messages (docs/protocol.md, "Batches")
            await ws.send(codec.encode(p.Hello(batch=True)))
        ack_every = max(1, (frame.limits.window or 256 * 1024) // 8) if frame.limits.ack_required else None
        return cls(ws, codec, name, ack_every)

    async def generate(self, prompt: str, max_tokens: int, *, temperature: float = 0.0,
                       gid: Any = None) -> Req:
        """Send one ``generate``; the returned Req's ``done`` future resolves at its end."""
        gid = gid if gid is not None else f"{self.name}.{next(self._ids)}"
        loop = asyncio.get_running_loop()
        r = Req(gid=gid, prompt=prompt, max_tokens=max_tokens, done=loop.create_future(),
                first_token=loop.create_future())
        self.reqs[gid] = r
        r.sent = r.last = clock()
        if self.tally is not None:
            self.tally.t_start = min(self.tally.t_start, r.sent)
        await self.ws.send(self.codec.encode(p.Generate(id=gid, prompt=prompt, max_tokens=max_tokens,
                                                        temperature=temperature, seed=0)))
        return r

    async def cancel(self, r: Req) -> None:
        from websockets.exceptions import ConnectionClosed

        r.cancel_sent = clock()
        try:
            await self.ws.send(self.codec.encode(p.Cancel(id=r.gid)))
        except ConnectionClosed:
            pass

    def _finish(self, r: Req, now: float) -> None:
        self.reqs.pop(r.gid, None)
        if self.tally is not None:
            self.tally.add(r, now)
            if r.cancel_sent is not None and r.reason == "cancelled":
                self.tally.cancel.append(now - r.cancel_sent)
        if r.done is not None and not r.done.done():
            r.done.set_result(None)
        if r.first_token is not None and not r.first_token.done():
            r.first_token.set_result(None)

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        decode = self.codec.decode_message
        try:
            async for data in self.ws:
                now = clock()
                if self.tally is not None:
                    self.tally.messages += 1
                done = False
                for f in decode(data):
                    self._on_frame(f, now)
                    self.received += not isinstance(f, p.Ready)
                    done = done or isinstance(f, p.Done)
                if self.ack_every is not None:
                    self._unacked += len(data)
                    if done or self._unacked >= self.ack_every:
                        self._unacked = 0
                        await self.ws.send(self.codec.encode(p.Ack(received=self.received)))
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            now = clock()
            for r in list(self.reqs.values()):
                r.error = "connection_closed"
                self._finish(r, now)

    def _on_frame(self, f: Any, now: float) -> None:
        if isinstance(f, p.Delta):
            r = self.reqs.get(f.id)
            if r is None:
                return
            t = self.tally
            if r.cancel_sent is not None:
                r.frames_after_cancel += 1
            if f.tokens:
                if r.first is None:
                    r.first = now
                    if r.first_token is not None and not r.first_token.done():
                        r.first_token.set_result(None)
                    if t is not None and f.tokens > 1:
                        t.itl.extend([(now - r.sent) / f.tokens] * (f.tokens - 1))
                elif t is not None:
                    t.itl.extend([(now - r.last) / f.tokens] * f.tokens)
                r.last = now
                r.tokens += f.tokens
                if t is not None:
                    t.tokens += f.tokens
            r.frames += 1
            if t is not None:
                t.frames += 1
        elif isinstance(f, p.Done):
            r = self.reqs.get(f.id)
            if r is not None:
                r.reason = f.reason
                self._finish(r, now)
        elif isinstance(f, p.Error):
            r = self.reqs.get(f.id) if f.id is not None else None
            if r is not None:
                r.error = f.code
                self._finish(r, now)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), 5)
        except Exception:
            pass
        self._reader.cancel()
        try:
            await self._reader
        except BaseException:
            pass


# --------------------------------------------------------------------------- raw stalled client


class RawConn:
    """A minimal WebSocket client over a raw socket, for readers that stop reading.

    It performs the opening handshake, reads ``ready``, sends masked
    ``generate`` frames, then pauses its transport: the server sees a peer
    whose receive window closes. A small ``SO_RCVBUF`` and ``TCP_MAXSEG``
    (set before connect) keep the kernel's buffers small, so the server's own
    send buffers fill after kilobytes rather than megabytes.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, url: str, *, rcvbuf: int | None, maxseg: int | None, timeout: float = 60.0) -> RawConn:
        u = urlsplit(url)
        sock = _socket(url, rcvbuf, maxseg)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (u.hostname, u.port)), timeout)
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"Sec-WebSocket-Protocol: {p.SUBPROTOCOL_MSGPACK}\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        c = cls(reader, writer)
        frame = p.MSGPACK.decode_any(await asyncio.wait_for(c.read_frame(), timeout))
        if not isinstance(frame, p.Ready):
            raise ConnectionError(f"expected ready, got {frame!r}")
        return c

    async def read_frame(self) -> bytes:
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return await self.reader.readexactly(n)

    def send(self, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x82])  # FIN + binary
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)

    def stop_reading(self) -> None:
        cast(asyncio.Transport, self.writer.transport).pause_reading()

    def abort(self) -> None:
        self.writer.transport.abort()


# --------------------------------------------------------------------------- the worker process


class Worker:
    def __init__(self, wid: int, spec: dict[str, Any], stop_event: Any) -> None:
        self.wid = wid
        self.spec = spec
        self.stop_event = stop_event
        self.conns: list[Conn] = []
        self.raw: list[RawConn] = []
        self.connect_errors: dict[str, int] = {}
        self.connect_times: list[float] = []

    async def connect(self) -> None:
        spec = self.spec
        n = spec["connections"]
        raw = spec.get("raw", False)
        sem = asyncio.Semaphore(spec.get("connect_parallel", 64))

        async def one(i: int) -> None:
            async with sem:
                t0 = clock()
                try:
                    if raw:
                        self.raw.append(await RawConn.open(spec["url"], rcvbuf=spec.get("rcvbuf"),
                                                           maxseg=spec.get("maxseg")))
                    else:
                        self.conns.append(await Conn.open(spec["url"], f"w{self.wid}c{i}", rcvbuf=spec.get("rcvbuf"),
                                                          maxseg=spec.get("maxseg"), batch=spec.get("batch", False)))
                    self.connect_times.append(clock() - t0)
                except Exception as exc:
                    key = type(exc).__name__ + (f": {exc}"[:80] if str(exc) else "")
                    self.connect_errors[key] = self.connect_errors.get(key, 0) + 1

        await asyncio.gather(*(one(i) for i in range(n)))

    def _tally(self) -> Tally:
        t = Tally()
        for c in self.conns:
            c.tally = t
        return t

    async def closed_loop(self, requests: list[tuple[str, int]], streams: int, temperature: float,
                          until_stop: bool = False) -> Tally:
        tally = self._tally()
        order = itertools.cycle(requests) if until_stop else iter(requests)
        stopping = [False]

        def stop(_: Any) -> None:
            # Stop starting new requests and cancel the live ones, so the phase ends at once.
            stopping[0] = True
            for c in self.conns:
                for r in list(c.reqs.values()):
                    if r.cancel_sent is None and not c.closed:
                        asyncio.get_running_loop().create_task(c.cancel(r))

        if until_stop:
            fut = asyncio.get_running_loop().run_in_executor(None, self.stop_event.wait)
            fut.add_done_callback(stop)

        async def slot(c: Conn) -> None:
            while not stopping[0] and not c.closed:
                try:
                    prompt, mt = next(order)
                except StopIteration:
                    return
                r = await c.generate(prompt, mt, temperature=temperature)
                assert r.done is not None
                await r.done

        await asyncio.gather(*(slot(c) for c in self.conns for _ in range(streams)))
        return tally

    async def poisson(self, requests: list[tuple[str, int]], rate: float, temperature: float, seed: int) -> Tally:
        tally = self._tally()
        rng = random.Random(seed)
        pending = []
        rr = itertools.cycle(self.conns)
        t_next = clock()
        for prompt, mt in requests:
            t_next += rng.expovariate(rate)
            delay = t_next - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            r = await next(rr).generate(prompt, mt, temperature=temperature)
            assert r.done is not None
            pending.append(r.done)
        await asyncio.gather(*pending)
        return tally

    async def cancel_probe(self, count: int, prompt: str, max_tokens: int) -> Tally:
        tally = self._tally()
        c = self.conns[0]
        for _ in range(count):
            r = await c.generate(prompt, max_tokens, temperature=0.0)
            assert r.first_token is not None and r.done is not None
            await r.first_token
            if r.done.done():
                continue  # ended before its first delta (too short to cancel): not counted
            await c.cancel(r)
            assert r.done is not None
            await r.done
        return tally

    async def one_each(self, prompt: str, max_tokens: int, temperature: float, gens: int = 1,
                       id_len: int | None = None) -> Tally:
        """Every connection starts ``gens`` generations at once (ids padded to ``id_len``); wait for all."""
        tally = self._tally()

        def gid(ci: int, g: int) -> Any:
            return None if id_len is None else f"w{self.wid}c{ci}g{g}-".ljust(id_len, "x")[:id_len]

        reqs = await asyncio.gather(*(c.generate(prompt, max_tokens, temperature=temperature, gid=gid(ci, g))
                                      for ci, c in enumerate(self.conns) for g in range(gens)))
        await asyncio.gather(*(r.done for r in reqs if r.done is not None))
        return tally

    async def stall(self, prompt: str, max_tokens: int, gens: int, id_len: int, read_first: float) -> dict[str, Any]:
        """Raw connections: send ``gens`` generations each, read for ``read_first`` s, then stop reading."""
        for ci, c in enumerate(self.raw):
            for g in range(gens):
                gid = f"w{self.wid}c{ci}g{g}-".ljust(id_len, "x")[:id_len]
                c.send(p.MSGPACK.encode(p.Generate(id=gid, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                                   seed=0)))
        await asyncio.sleep(read_first)
        for c in self.raw:
            c.stop_reading()
        return {"stalled_at": time.time(), "stalled": len(self.raw)}

    async def serve(self, cmd_q: Any, out_q: Any) -> None:
        loop = asyncio.get_running_loop()
        await self.connect()
        out_q.put({"wid": self.wid, "op": "connected", "ok": len(self.conns) + len(self.raw),
                   "errors": self.connect_errors, "connect_times": self.connect_times})
        while True:
            cmd = await loop.run_in_executor(None, cmd_q.get)
            op = cmd["op"]
            cpu0 = _cpu()
            ans: dict[str, Any] = {"wid": self.wid, "op": op}
            if op == "run":
                ans.update((await self.closed_loop(cmd["requests"], cmd["streams"], cmd.get("temperature", 0.0)))
                           .as_dict())
            elif op == "background":
                ans.update((await self.closed_loop(cmd["requests"], cmd["streams"], cmd.get("temperature", 0.0),
                                                   until_stop=True)).as_dict())
            elif op == "poisson":
                ans.update((await self.poisson(cmd["requests"], cmd["rate"], cmd.get("temperature", 0.0),
                                               cmd.get("seed", self.wid))).as_dict())
            elif op == "cancel_probe":
                ans.update((await self.cancel_probe(cmd["count"], cmd["prompt"], cmd["max_tokens"])).as_dict())
            elif op == "one_each":
                ans.update((await self.one_each(cmd["prompt"], cmd["max_tokens"], cmd.get("temperature", 0.0),
                                                cmd.get("gens", 1), cmd.get("id_len"))).as_dict())
            elif op == "stall":
                ans.update(await self.stall(cmd["prompt"], cmd["max_tokens"], cmd["gens"], cmd["id_len"],
                                            cmd.get("read_first", 0.0)))
            elif op == "close":
                for c in self.raw:
                    c.abort()
                await asyncio.gather(*(c.close() for c in self.conns))
                ans["cpu_s"] = _cpu() - cpu0
                out_q.put(ans)
                return
            ans["cpu_s"] = _cpu() - cpu0
            out_q.put(ans)


def worker_main(wid: int, spec: dict[str, Any], cmd_q: Any, out_q: Any, stop_event: Any) -> None:
    """Process entry point (spawned): run a :class:`Worker` until ``close``."""
    try:
        import uvloop

        run: Callable[..., Any] = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    try:
        run(Worker(wid, spec, stop_event).serve(cmd_q, out_q))
    except BaseException as exc:  # the parent must not wait forever for this worker
        out_q.put({"wid": wid, "op": "crashed", "error": f"{type(exc).__name__}: {exc}"})
        raise


# --------------------------------------------------------------------------- the parent's side


class Fleet:
    """Worker processes holding ``connections`` sessions to ``url`` between them."""

    def __init__(self, url: str, connections: int, procs: int, *, raw: bool = False, rcvbuf: int | None = None,
                 maxseg: int | None = None, timeout: float = 300.0, batch: bool = False) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        procs = max(1, min(procs, connections))
        self.timeout = timeout
        self.out_q = ctx.Queue()
        self.stop_event = ctx.Event()
        self.cmd_qs = [ctx.Queue() for _ in range(procs)]
        share = [connections // procs + (1 if i < connections % procs else 0) for i in range(procs)]
        self.shares = share
        self.procs = [
            ctx.Process(target=worker_main, args=(i, {"url": url, "connections": share[i], "raw": raw,
                                                      "rcvbuf": rcvbuf, "maxseg": maxseg, "batch": batch},
                                                  self.cmd_qs[i], self.out_q, self.stop_event), daemon=True)
            for i in range(procs)
        ]
        for pr in self.procs:
            pr.start()
        self.connected = self._collect("connected")
        self.num_connected = sum(a["ok"] for a in self.connected)
        self.connect_errors: dict[str, int] = {}
        for a in self.connected:
            for k, v in a["errors"].items():
                self.connect_errors[k] = self.connect_errors.get(k, 0) + v

    def _collect(self, op: str, n: int | None = None) -> list[dict[str, Any]]:
        import queue

        out: list[dict[str, Any]] = []
        want = len(self.procs) if n is None else n
        deadline = time.monotonic() + self.timeout
        while len(out) < want:
            try:
                a = self.out_q.get(timeout=0.5)
            except queue.Empty:
                dead = [pr.exitcode for pr in self.procs if pr.exitcode is not None]
                if dead and op != "close":
                    raise RuntimeError(f"a client process exited (codes {dead}) before answering {op!r}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"workers did not answer {op!r} within {self.timeout} s") from None
                continue
            if a["op"] == "crashed":
                raise RuntimeError(f"worker {a['wid']} crashed: {a['error']}")
            out.append(a)
        return out

    def send(self, cmds: list[dict[str, Any]]) -> None:
        for q, c in zip(self.cmd_qs, cmds):
            q.put(c)

    def all(self, cmd: dict[str, Any] | Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
        """Send one command to every worker (or ``cmd(i)``) and wait for every answer."""
        self.send([cmd(i) if callable(cmd) else cmd for i in range(len(self.procs))])
        return self._collect(cmd(0)["op"] if callable(cmd) else cmd["op"])

    def close(self) -> None:
        try:
            self.send([{"op": "close"}] * len(self.procs))
            self._collect("close")
        except Exception:
            pass
        for pr in self.procs:
            pr.join(10)
            if pr.is_alive():
                pr.kill()
                pr.join(5)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine per-worker tallies: lists concatenated, counts summed, wall = last end - first start."""
    out: dict[str, Any] = {"tokens": 0, "frames": 0, "messages": 0, "requests": 0, "ttft": [], "itl": [], "e2e": [], "cancel": [],
                           "reasons": {}, "errors": {}, "cpu_s": 0.0}
    t_start, t_end = float("inf"), 0.0
    for a in answers:
        for k in ("tokens", "frames", "messages", "requests"):
            out[k] += a.get(k, 0)
        for k in ("ttft", "itl", "e2e", "cancel"):
            out[k].extend(a.get(k, []))
        for k in ("reasons", "errors"):
            for kk, v in a.get(k, {}).items():
                out[k][kk] = out[k].get(kk, 0) + v
        out["cpu_s"] += a.get("cpu_s", 0.0)
        t_start = min(t_start, a.get("t_start", float("inf")))
        t_end = max(t_end, a.get("t_end", 0.0))
    out["wall"] = t_end - t_start if t_end > t_start else float("nan")
    out["tok_s"] = out["tokens"] / out["wall"] if out["wall"] == out["wall"] and out["wall"] > 0 else float("nan")
    return out


def split(items: list[Any], shares: list[int]) -> list[list[Any]]:
    """Split ``items`` proportionally to ``shares`` (interleaved, so each part sees the same mix)."""
    total = sum(shares)
    parts: list[list[Any]] = [[] for _ in shares]
    # Weighted round-robin: deal items to the worker furthest below its share.
    given = [0] * len(shares)
    for it in items:
        i = min(range(len(shares)), key=lambda j: (given[j] + 1) / shares[j] if shares[j] else float("inf"))
        parts[i].append(it)
        given[i] += 1
    assert sum(len(x) for x in parts) == len(items) and total >= 0
    return parts
