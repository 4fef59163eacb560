"""Print the example exchanges of docs/protocol.md (acks, resume, conversations) from a real server.

    PYTHONPATH=. python docs/examples/sessions_exchange.py

Starts the bundled model on 127.0.0.1 (port 0), speaks the JSON codec, and prints every frame
(``→`` client, ``←`` server) exactly as sent. Greedy decoding, so a rerun prints the same text.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import connect

from rtws.config import ServerConfig
from rtws.server import run_in_thread, stop_thread


class Wire:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.received = 0

    async def send(self, frame: dict[str, Any]) -> None:
        text = json.dumps(frame, separators=(",", ":"))
        print("→", text)
        await self.ws.send(text)

    async def recv(self) -> dict[str, Any]:
        text = await asyncio.wait_for(self.ws.recv(), 30)
        frame: dict[str, Any] = json.loads(text)
        if frame["type"] != "ready":
            self.received += 1
        print("←", text)
        return frame

    async def until(self, kind: str, gid: Any = None) -> dict[str, Any]:
        while True:
            f = await self.recv()
            if f["type"] == kind and (gid is None or f.get("id") == gid):
                return f


async def main(url: str) -> None:
    sub = ["rtws.v1.json"]
    print("## acknowledgement window")
    w = Wire(await connect(url, subprotocols=sub))  # type: ignore[list-item]
    await w.recv()
    await w.send({"type": "ack", "received": 0})
    await w.send({"type": "generate", "id": "a", "prompt": "ROMEO:\n", "max_tokens": 6, "temperature": 0})
    await w.until("done", "a")
    await w.send({"type": "ack", "received": w.received})
    await w.ws.close()

    print("\n## resume")
    w = Wire(await connect(url, subprotocols=sub))  # type: ignore[list-item]
    ready = await w.recv()
    await w.send({"type": "ack", "received": 0})
    await w.send({"type": "generate", "id": "b", "prompt": "JULIET:\n", "max_tokens": 12, "temperature": 0})
    await w.recv()
    await w.recv()
    print(f"   (the TCP connection is reset here: no close frame; {w.received} frames received)")
    w.ws.transport.abort()
    await asyncio.sleep(0.5)
    n = w.received
    w = Wire(await connect(url, subprotocols=sub))  # type: ignore[list-item]
    w.received = n
    await w.recv()  # the fresh session's ready (auth off: sent before the server reads hello)
    await w.send({"type": "hello", "resume": ready["resume_token"], "received": n})
    await w.until("done", "b")
    await w.send({"type": "ack", "received": w.received})
    await w.ws.close()
    print("   (a second try with the same, now spent, token:)")
    w = Wire(await connect(url, subprotocols=sub))  # type: ignore[list-item]
    await w.recv()
    await w.send({"type": "hello", "resume": ready["resume_token"], "received": n})
    await w.recv()
    await w.ws.close()

    print("\n## conversations")
    w = Wire(await connect(url, subprotocols=sub))  # type: ignore[list-item]
    await w.recv()
    await w.send({"type": "generate", "id": 1, "conversation": "c1", "max_tokens": 8, "temperature": 0,
                  "messages": [{"role": "system", "content": "Speak as Juliet."},
                               {"role": "user", "content": "Good morrow."}]})
    await w.until("done", 1)
    await w.send({"type": "generate", "id": 2, "conversation": "c1", "max_tokens": 8, "temperature": 0,
                  "messages": [{"role": "user", "content": "What news?"}]})
    await w.send({"type": "generate", "id": 3, "conversation": "c1", "max_tokens": 8, "temperature": 0,
                  "messages": [{"role": "user", "content": "And more?"}]})
    await w.until("done", 2)
    await w.send({"type": "history", "conversation": "c1"})
    await w.until("conversation")
    await w.send({"type": "forget", "conversation": "c1"})
    await w.send({"type": "history", "conversation": "c1"})
    await w.until("error")
    await w.ws.close()


if __name__ == "__main__":
    server, thread = run_in_thread(ServerConfig(port=0, log_level="WARNING"), None)
    try:
        asyncio.run(main(f"ws://127.0.0.1:{server.port}/ws"))
    finally:
        stop_thread(server, thread)
