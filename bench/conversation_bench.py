"""A 10-turn chat on one session: server-held ``conversation`` (only the new line is sent) against
re-sending the whole history as ``messages`` every turn, on the bundled model.

    python bench/conversation_bench.py                 # 10 turns, max_tokens 12, greedy
    python bench/conversation_bench.py --turns 6 --max-tokens 8

Each mode has its own server child (``bench/serve_child.py``, prefix cache on, as ``rtws serve``
runs), so neither finds the other's KV blocks; the two chats advance turn by turn, alternating which
goes first, so machine noise hits both alike. Each of ``--rounds`` chats has its own system prompt
(no round finds an earlier one's blocks). Both send the same user lines, greedy; a client acks at
every ``done`` (counted in the bytes). The messages mode slides its
history the way the v1 clients did: when the server refuses a prompt as too long it drops the oldest
exchange and sends the turn again (those bytes count too). Per turn: bytes the client sent, time to
first token (``generate`` sent -> first delta with text), prompt tokens and cached prompt tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ServerProcess, ms, num, percentile, print_header, print_table  # noqa: E402

LINES = ["Good morrow, sweet lady.", "What news from Verona?", "Art thou well to-day?", "Speak, I pray thee.",
         "Where is thy father?", "Why dost thou weep?", "Who comes there?", "What say'st thou now?",
         "Shall we away?", "Farewell, and return anon!"]


class Chat:
    """One session speaking one mode; :meth:`turn` runs one turn and returns its figures."""

    def __init__(self, ws: Any, mode: str, max_tokens: int, system: str) -> None:
        self.ws = ws
        self.mode = mode
        self.max_tokens = max_tokens
        self.received = 0
        self.history: list[dict[str, str]] = [{"role": "system", "content": system}]
        self.first_turn = True

    @classmethod
    async def open(cls, url: str, mode: str, max_tokens: int, system: str) -> Chat:
        import msgspec
        from websockets.asyncio.client import connect

        ws = await connect(url, compression=None)
        raw = msgspec.msgpack.decode(await ws.recv(decode=False))
        assert raw["type"] == "ready", raw
        return cls(ws, mode, max_tokens, system)

    async def _send(self, frame: dict[str, Any]) -> int:
        import msgspec

        data = msgspec.msgpack.encode(frame)
        await self.ws.send(data)
        return len(data)

    async def turn(self, i: int) -> dict[str, Any]:
        import msgspec

        line = {"role": "user", "content": LINES[i % len(LINES)]}
        sent = 0
        while True:
            if self.mode == "conversation":
                # The first turn carries the system prompt; later ones only the new line.
                msgs = [*self.history, line] if self.first_turn else [line]
                frame = {"type": "generate", "id": i, "conversation": "c", "messages": msgs,
                         "max_tokens": self.max_tokens, "temperature": 0.0}
            else:
                frame = {"type": "generate", "id": i, "messages": [*self.history, line],
                         "max_tokens": self.max_tokens, "temperature": 0.0}
            sent += await self._send(frame)
            t0 = time.perf_counter()
            first: float | None = None
            text = []
            done: dict[str, Any] | None = None
            refused = False
            while done is None:
                f = msgspec.msgpack.decode(await self.ws.recv())
                self.received += 1
                if f["type"] == "delta":
                    if f["text"] and first is None:
                        first = time.perf_counter()
                    text.append(f["text"])
                elif f["type"] == "done":
                    done = f
                elif f["type"] == "error":
                    if self.mode == "messages" and f["message"].startswith("prompt is") and len(self.history) > 1:
                        del self.history[1:3]  # the v1 clients' sliding window (the system prompt stays)
                        refused = True
                        break
                    raise RuntimeError(f"turn {i}: {f}")
            if not refused:
                break
        assert done is not None
        self.first_turn = False
        sent += await self._send({"type": "ack", "received": self.received})
        reply = "".join(text)
        self.history += [line, {"role": "assistant", "content": reply}]
        dropped = done.get("dropped", 0)
        if dropped:
            del self.history[1:1 + dropped]
        usage = done["usage"]
        return {"turn": i + 1, "bytes": sent, "ttft": (first - t0) if first is not None else float("nan"),
                "prompt": usage["prompt_tokens"], "cached": usage.get("cached_tokens", 0) or 0,
                "dropped": dropped, "reply": reply}


async def run_rounds(urls: dict[str, str], turns: int, max_tokens: int, rounds: int) -> dict[str, list[list[Any]]]:
    """``rounds`` chats per mode, the modes alternating turn by turn (who goes first alternates too)."""
    out: dict[str, list[list[Any]]] = {m: [] for m in urls}
    for r in range(rounds):
        # A different system prompt per round: no round finds an earlier round's blocks in the cache.
        system = f"Round {r + 1}. Thou speakest in the manner of the Bard."
        chats = {m: await Chat.open(u, m, max_tokens, system) for m, u in urls.items()}
        res: dict[str, list[Any]] = {m: [] for m in urls}
        for i in range(turns):
            order = list(urls) if (i + r) % 2 == 0 else list(reversed(list(urls)))
            for m in order:
                res[m].append(await chats[m].turn(i))
        for m, c in chats.items():
            await c.ws.close()
            out[m].append(res[m])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled one)")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3, help="chats per mode (TTFT is the median over them)")
    args = ap.parse_args(argv)
    if args.model is None:
        from rtws.default_model import DEFAULT_MODEL_PATH

        args.model = str(DEFAULT_MODEL_PATH)
    print_header("conversation_bench", args)
    with ServerProcess({"model": args.model}) as s1, ServerProcess({"model": args.model}) as s2:
        runs = asyncio.run(run_rounds({"conversation": s1.url, "messages": s2.url}, args.turns, args.max_tokens,
                                      args.rounds))
    conv, full = runs["conversation"], runs["messages"]
    rows = []
    for t in range(args.turns):
        c = [r[t] for r in conv]
        f = [r[t] for r in full]
        rows.append([str(t + 1), num(c[0]["bytes"]), num(f[0]["bytes"]),
                     ms(percentile([x["ttft"] for x in c], 50)), ms(percentile([x["ttft"] for x in f], 50)),
                     f"{c[0]['prompt']}/{c[0]['cached']}", f"{f[0]['prompt']}/{f[0]['cached']}",
                     str(c[0]["dropped"])])
    print_table(f"conversation_bench: per turn (bytes the client sent; TTFT ms, median of {args.rounds} rounds; "
                "prompt/cached tokens of round 1)",
                ["turn", "conv bytes", "messages bytes", "conv TTFT", "messages TTFT", "conv prompt/cached",
                 "messages prompt/cached", "conv dropped"], rows)
    same = sum(c["reply"] == f["reply"] for rc, rf in zip(conv, full) for c, f in zip(rc, rf))
    n = args.turns * args.rounds
    tot_c, tot_f = sum(x["bytes"] for x in conv[0]), sum(x["bytes"] for x in full[0])
    tt_c = [x["ttft"] for r in conv for x in r[1:]]
    tt_f = [x["ttft"] for r in full for x in r[1:]]
    print_table("conversation_bench: summary", ["figure", "conversation", "messages"], [
        ["bytes sent, all turns of one chat", num(tot_c), num(tot_f)],
        ["bytes sent, last turn", num(conv[0][-1]["bytes"]), num(full[0][-1]["bytes"])],
        ["TTFT p50 ms, turns 2.., all rounds", ms(percentile(tt_c, 50)), ms(percentile(tt_f, 50))],
        ["TTFT p90 ms, turns 2.., all rounds", ms(percentile(tt_c, 90)), ms(percentile(tt_f, 90))],
        ["prompt tokens cached, turns 2.. (round 1)",
         f"{sum(x['cached'] for x in conv[0][1:])}/{sum(x['prompt'] for x in conv[0][1:])}",
         f"{sum(x['cached'] for x in full[0][1:])}/{sum(x['prompt'] for x in full[0][1:])}"],
        ["replies identical to the other mode", f"{same}/{n}", f"{same}/{n}"],
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
