"""Checks the Ray Serve tests share: the same client-side assertions behind Serve's proxy
(tests/integration/test_ray.py, an in-process cluster) and behind Serve's HAProxy ingress
(tests/integration/test_ray_haproxy.py, ``rtws serve-ray`` in a child process).

A ``target`` is anything with ``.ws`` (the WebSocket URL) and ``.http`` (the base URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from tests.helpers.http import parse_sse, post
from tests.helpers.server import UNIT
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from rtws import protocol as p
from rtws.client import Client

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


async def session(url: str, subprotocols: list[str] | None = None) -> tuple[Any, p.Ready]:
    """A raw WebSocket (msgpack) and its ready frame."""
    ws = await connect(url, subprotocols=subprotocols or [p.SUBPROTOCOL_MSGPACK], compression=None,  # type: ignore[arg-type]
                       max_size=2**24, open_timeout=30 * UNIT)
    frame = p.codec_for(p.SUBPROTOCOL_MSGPACK).decode_any(await asyncio.wait_for(ws.recv(), 30 * UNIT))
    assert isinstance(frame, p.Ready), frame
    return ws, frame


def send(ws: Any, frame: Any) -> Any:
    return ws.send(p.codec_for(p.SUBPROTOCOL_MSGPACK).encode(frame))


def decode(data: Any) -> Any:
    return p.codec_for(p.SUBPROTOCOL_MSGPACK).decode_any(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree(root: int | None = None) -> set[int]:
    """``root`` (default: this process) and every live descendant (Ray's GCS, raylet, agents, workers),
    from /proc/<pid>/task/*/children (as bench/common.process_tree)."""
    found: set[int] = set()
    todo = [os.getpid() if root is None else root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return found


def listeners(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the processes hold (from /proc, no psutil)."""
    inode_pid: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inode_pid[target[8:-1]] = pid
        except OSError:
            pass
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inode_pid:  # 0A: LISTEN
                    continue
                hex_addr, hex_port = local.split(":")
                raw = bytes.fromhex(hex_addr)
                if v6:
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    addr = socket.inet_ntop(socket.AF_INET6, words)
                else:
                    addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
                out.append((inode_pid[inode], addr, int(hex_port, 16)))
    return out


def scrape(target: Any, replica: str) -> dict[str, float]:
    """``/metrics`` of one replica: the affinity header pins plain HTTP requests too. Returns name -> sum."""
    import urllib.request

    req = urllib.request.Request(target.http + "/metrics", headers={"Sec-WebSocket-Protocol": f"rtws.replica.{replica}"})
    with urllib.request.urlopen(req, timeout=30 * UNIT) as r:
        body = r.read().decode()
    assert f'replica="{replica}"' in body, "the router did not pin the scrape"
    out: dict[str, float] = {}
    for ln in body.splitlines():
        if ln and not ln.startswith("#"):
            name = ln.split("{", 1)[0].split(" ", 1)[0]
            out[name] = out.get(name, 0.0) + float(ln.rsplit(" ", 1)[1])
    return out


async def paused_and_quiet(target: Any, replica: str, n: int, window: int, quiet_s: float) -> float:
    """Wait (reading and acking nothing) until ``n`` generations of ``replica`` are paused, then check that the
    replica sends less than a quarter window more over ``quiet_s`` seconds: the window stopped it. Returns when
    (``time.monotonic()``) the pause was seen."""
    deadline = time.monotonic() + 90 * UNIT
    paused = 0.0
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        paused = (await asyncio.to_thread(scrape, target, replica)).get("rtws_requests_paused", 0.0)
        if paused >= n:
            break
    assert paused >= n, f"only {paused} of {n} generations paused"
    paused_at = time.monotonic()
    first = (await asyncio.to_thread(scrape, target, replica))["rtws_sent_bytes_total"]
    await asyncio.sleep(quiet_s)
    second = (await asyncio.to_thread(scrape, target, replica))["rtws_sent_bytes_total"]
    assert second - first < window // 4, (first, second, window)  # the replica stopped writing
    return paused_at


def check_cancel(target: Any) -> None:
    async def main() -> None:
        ws, _ = await session(target.ws)
        try:
            await send(ws, p.Generate(id="c", prompt="ROMEO:", max_tokens=3000))
            deltas = 0
            while deltas < 3:
                f = decode(await asyncio.wait_for(ws.recv(), 30 * UNIT))
                if isinstance(f, p.Delta):
                    deltas += 1
            await send(ws, p.Cancel(id="c"))
            while True:
                f = decode(await asyncio.wait_for(ws.recv(), 30 * UNIT))
                if isinstance(f, p.Done):
                    assert f.reason == "cancelled" and f.usage.completion_tokens < 3000
                    break
                assert isinstance(f, p.Delta) and f.id == "c"
            # Nothing with that id after its done (the proxy must not reorder or replay).
            with contextlib.suppress(asyncio.TimeoutError):
                while True:
                    f = decode(await asyncio.wait_for(ws.recv(), 0.5 * UNIT))
                    assert getattr(f, "id", None) != "c", f
        finally:
            await ws.close()

    asyncio.run(main())


def check_frame_limit(target: Any) -> None:
    """Serve's proxy allows 16 MiB frames; rtws itself closes 1009 above max_frame_bytes (from ready.limits),
    and another session is unaffected."""
    async def main() -> None:
        other = await Client.connect(target.ws, open_timeout=30 * UNIT)
        stream = await other.generate("steady", max_tokens=40)
        ws, ready = await session(target.ws)
        limit = ready.limits.max_frame_bytes
        assert limit
        big = p.codec_for(p.SUBPROTOCOL_MSGPACK).encode(p.Generate(id="big", prompt="a" * limit, max_tokens=1))
        assert len(big) > limit
        await ws.send(big)
        with pytest.raises(ConnectionClosed) as info:
            while True:
                f = decode(await asyncio.wait_for(ws.recv(), 30 * UNIT))
                assert not isinstance(f, p.Error), f  # no bad_frame: the frame is refused, not parsed
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009, info.value
        result = await asyncio.wait_for(stream.result(), 60 * UNIT)
        assert result.reason == "length" and result.completion_tokens == 40
        await other.close()

    asyncio.run(main())


def check_infer_sse(target: Any) -> None:
    r = post(target.http, "/infer", {"prompt": "ROMEO:", "max_tokens": 8, "seed": 3}, timeout=60 * UNIT)
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.body)
    assert events[-1][0] == "done"
    done = msgspec.json.decode(events[-1][1])
    assert done["reason"] == "length" and done["usage"]["completion_tokens"] == 8
    text = "".join(msgspec.json.decode(data)["text"] for ev, data in events if ev == "message")
    same = post(target.http, "/infer", {"prompt": "ROMEO:", "max_tokens": 8, "seed": 3, "stream": False},
                timeout=60 * UNIT).json()
    assert same["text"] == text  # both replicas hold the same weights: seeded output is replica-independent


def check_openai_client(target: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=target.http + "/v1", api_key="unused", max_retries=0, timeout=60 * UNIT)
    try:
        c = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=6, seed=1)
        assert c.choices[0].finish_reason == "length" and c.usage is not None and c.usage.completion_tokens == 6
        chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=6, stream=True))
        assert chunks[-1].choices[0].finish_reason == "length" or chunks[-2].choices[0].finish_reason == "length"
        assert [m.id for m in client.models.list().data] == ["tiny"]
    finally:
        client.close()


def check_slow_reader_pauses_at_the_window(target: Any) -> None:
    """Serve's proxy never blocks a replica's send, so socket backpressure cannot reach the session behind it
    (behind HAProxy it can, after a socket buffer of bytes); the acknowledgement window does either way
    (rtws.ray turns require_ack on). A client that reads and acks nothing has its generations paused once a
    window of bytes is unacknowledged, and the replica stops sending."""
    async def main() -> None:
        ws, ready = await session(target.ws)
        window = ready.limits.window
        assert window and ready.replica and ready.limits.ack_required  # no opt-in ack needed
        for j in range(16):
            await send(ws, p.Generate(id=f"s{j}", prompt="x", max_tokens=4000))
        await paused_and_quiet(target, ready.replica, 16, window, 1.5 * UNIT)  # read nothing, ack nothing
        # Reading and acking resumes them: the client takes what was sent and acks it.
        received = 0
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                decode(await asyncio.wait_for(ws.recv(), 2.0 * UNIT))
                received += 1
                if received % 64 == 0:
                    await send(ws, p.Ack(received=received))
                if received > 2000:
                    break
        assert received > 2000  # more than was sent before the pause: the generations went on
        await ws.close()

    asyncio.run(main())


@dataclass
class Outcome:
    replica: str
    close_code: int | None = None
    done: dict[str, str] | None = None
    accepted: int = 0
    overloaded: int = 0
    errors: list[str] | None = None
    unanswered: list[str] | None = None


async def live_session(url: str, stop: asyncio.Event) -> Outcome:
    """Start 1 long generation, then keep offering short ones until the socket closes or ``stop``."""
    ws, ready = await session(url)
    out = Outcome(replica=ready.replica or "", done={}, errors=[])
    assert out.done is not None and out.errors is not None
    live: set[str] = set()
    await send(ws, p.Generate(id="long", prompt="x", max_tokens=4000))  # outlives the drain's timeout
    live.add("long")
    out.accepted += 1
    n = 0

    async def offer() -> None:
        nonlocal n
        while not stop.is_set():
            await asyncio.sleep(0.25)
            n += 1
            with contextlib.suppress(ConnectionClosed):
                await send(ws, p.Generate(id=f"p{n}", prompt="y", max_tokens=2))
                live.add(f"p{n}")

    offerer = asyncio.get_running_loop().create_task(offer())
    cancel_sent = False
    received = 0  # frames, acked every 64 (rtws.ray requires acks: ready.limits.ack_required)
    deadline = time.monotonic() + 180 * UNIT
    try:
        while time.monotonic() < deadline:
            if stop.is_set() and not cancel_sent and "long" not in out.done:
                cancel_sent = True
                with contextlib.suppress(ConnectionClosed):
                    await send(ws, p.Cancel(id="long"))
            try:
                f = decode(await asyncio.wait_for(ws.recv(), 0.5))
                received += 1
                if received % 64 == 0 or isinstance(f, p.Done):
                    with contextlib.suppress(ConnectionClosed):
                        await send(ws, p.Ack(received=received))
            except ConnectionClosed as exc:
                out.close_code = exc.rcvd.code if exc.rcvd is not None else None
                break
            except asyncio.TimeoutError:
                f = None
            if isinstance(f, p.Done):
                out.done[str(f.id)] = f.reason
            elif isinstance(f, p.Error) and f.id is not None:
                live.discard(str(f.id))
                if f.code == "overloaded":
                    out.overloaded += 1
                else:
                    out.errors.append(f.code)
            if stop.is_set() and not (live - set(out.done)):
                break
    finally:
        offerer.cancel()
        with contextlib.suppress(BaseException):
            await offerer
        await ws.close()
    # Every generation the server accepted ended with its done. A probe can go unanswered only when it
    # crossed the server's close on the wire (during a drain every probe is refused with overloaded).
    out.accepted = len(live)
    out.unanswered = sorted(live - set(out.done))
    return out


def check_drained(outcomes: list[Outcome], removed: set[str]) -> None:
    drained = [o for o in outcomes if o.replica in removed]
    assert drained, ("no session on a removed replica", removed, [o.replica for o in outcomes])
    for o in drained:
        assert o.close_code == 1001, o  # "going away", not 1006
        assert o.done is not None and o.done.get("long") in ("length", "cancelled"), o
        assert o.overloaded >= 1, o  # new work during the drain was refused with overloaded
        assert not o.errors, o
        assert o.unanswered is not None and len(o.unanswered) <= 1 and "long" not in o.unanswered, o
    for o in outcomes:
        assert o.done is not None and "long" in o.done, o


async def resume_after_a_drop(target: Any) -> tuple[str, str]:
    """A dropped socket mid-stream: the Python client reconnects with its resume token (offering
    rtws.replica.<id>), lands on the replica that holds the session, which replays the unacknowledged
    frames: the text is complete and not duplicated. Returns (replica, resume token)."""
    client = await Client.connect(target.ws, open_timeout=30 * UNIT)
    assert client.ready is not None and client.ready.replica and client.ready.resume_token
    replica, token = client.ready.replica, client.ready.resume_token
    stream = await client.generate("ROMEO:", max_tokens=120, seed=5)
    parts = 0
    async for _ in stream:
        parts += 1
        if parts == 10:
            client.ws.transport.abort()  # an unclean drop: the server holds the session
            break
    result = await asyncio.wait_for(stream.result(), 60 * UNIT)
    assert client.resumes == 1 and client.ready.replica == replica and client.ready.resumed
    full = (await asyncio.to_thread(post, target.http, "/infer",
                                    {"prompt": "ROMEO:", "max_tokens": 120, "seed": 5, "stream": False},
                                    None, 60 * UNIT)).json()
    assert result.text == full["text"] and result.completion_tokens == 120
    await client.close()
    return replica, token


def drain_run(target: Any, change: Any) -> list[Outcome]:
    """16 live sessions (live_session) while ``change`` runs in a thread (a scale-down, a redeploy, a SIGTERM);
    then the sessions still open are stopped. Returns their outcomes."""
    async def main() -> list[Outcome]:
        stop = asyncio.Event()
        tasks = [asyncio.get_running_loop().create_task(live_session(target.ws, stop)) for _ in range(16)]
        await asyncio.sleep(2.0 * UNIT)  # all 16 streaming
        deployer = threading.Thread(target=change, daemon=True)
        deployer.start()
        while deployer.is_alive():
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0 * UNIT)
        stop.set()  # sessions still open cancel their long generation and collect its done
        return list(await asyncio.wait_for(asyncio.gather(*tasks), 120 * UNIT))

    return list(asyncio.run(main()))
