"""``rtws chat [URL]``: a terminal chat client on :mod:`rtws.client`.

The main thread reads lines (with readline editing when stdin is a terminal);
one background thread runs an asyncio loop holding the WebSocket session. A
reply streams to stdout while the main thread waits for it, so Ctrl-C (SIGINT,
which Python delivers to the main thread) lands there: it sends ``cancel`` for
the current generation and the chat goes on. Ctrl-C at the prompt, or Ctrl-D,
``/quit`` or end of input, leaves.

The conversation is held by the server (``generate {conversation}``): each
line sends only the new user turn, and the server appends the reply as it was
delivered. When the history outgrows the model's context the server drops the
oldest exchange and says so. A local copy of the turns is kept so that, if the
session is ever lost (the server restarted), the next line starts a new server
conversation with the whole history. ``/reset`` forgets it on both sides. The
client resumes the session transparently after a dropped connection.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

from websockets.exceptions import ConnectionClosed

from .client import Client, ConnectionLost, GenerationError, ServerError

T = TypeVar("T")

HELP = """\
commands:
  /temp X        sampling temperature (0 = greedy)
  /top_p X       nucleus sampling threshold, 0 < X <= 1
  /max N         most tokens in a reply
  /stop [SEQ..]  stop sequences, escapes like \\n allowed; none given: no stop sequence
  /settings      show the current settings
  /reset         forget the conversation
  /help          this text
  /quit          leave (also Ctrl-D)
Ctrl-C stops the reply being written; at the prompt it leaves."""


@dataclass(slots=True)
class Settings:
    """Sampling options sent with every ``generate``. ``stop`` defaults to the end of a speech."""

    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 200
    stop: list[str] = field(default_factory=lambda: ["\n\n"])

    def describe(self) -> str:
        stops = ", ".join(repr(s) for s in self.stop) or "none"
        return (f"temperature={self.temperature:g} top_p={self.top_p:g} max_tokens={self.max_tokens} "
                f"stop={stops}")


class CommandError(ValueError):
    """A ``/command`` with a bad argument; the message is shown to the user."""


def unescape(text: str) -> str:
    r"""Decode ``\n``, ``\t``, ``\r`` and ``\\`` in a stop sequence typed by a person."""
    out: list[str] = []
    it = iter(text)
    for ch in it:
        if ch != "\\":
            out.append(ch)
            continue
        nxt = next(it, "")
        out.append({"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}.get(nxt, "\\" + nxt))
    return "".join(out)


def apply_command(line: str, settings: Settings, max_tokens_limit: int | None = None) -> str:
    """Apply one settings command (``/temp``, ``/top_p``, ``/max``, ``/stop``) to ``settings``.

    Returns the confirmation to print. Raises :class:`CommandError` for a bad
    argument and ``KeyError`` for a command this function does not handle.
    """
    name, _, rest = line.strip().partition(" ")
    arg = rest.strip()
    if name in ("/temp", "/temperature"):
        value = _number(arg, name)
        if not 0.0 <= value <= 100.0:
            raise CommandError("temperature must be between 0 and 100")
        settings.temperature = value
        return f"temperature = {value:g}"
    if name in ("/top_p", "/topp"):
        value = _number(arg, name)
        if not 0.0 < value <= 1.0:
            raise CommandError("top_p must be > 0 and <= 1")
        settings.top_p = value
        return f"top_p = {value:g}"
    if name in ("/max", "/max_tokens"):
        try:
            n = int(arg)
        except ValueError:
            raise CommandError(f"usage: {name} N (a whole number)") from None
        if n < 1:
            raise CommandError("max tokens must be >= 1")
        if max_tokens_limit is not None and n > max_tokens_limit:
            raise CommandError(f"the server allows at most {max_tokens_limit} tokens")
        settings.max_tokens = n
        return f"max_tokens = {n}"
    if name == "/stop":
        settings.stop = [unescape(s) for s in arg.split()] if arg else []
        return "stop = " + (", ".join(repr(s) for s in settings.stop) or "none")
    raise KeyError(name)


def _number(arg: str, name: str) -> float:
    try:
        value = float(arg)
    except ValueError:
        raise CommandError(f"usage: {name} X (a number)") from None
    if not math.isfinite(value):
        raise CommandError(f"{name} needs a finite number")
    return value


class LoopThread:
    """An asyncio loop in a daemon thread; :meth:`call` runs a coroutine there and blocks for its result.

    The thread (and the executor threads it starts, which inherit its signal
    mask) blocks SIGINT, so the kernel always delivers Ctrl-C to the main
    thread, where it interrupts ``input()`` or the wait for a reply.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="rtws-chat-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass(slots=True)
class Reply:
    text: str
    reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    elapsed_s: float
    dropped: int = 0  # conversation turns the server dropped to fit this prompt


class _Turn:
    """One generation's cancel state. Used on the loop thread only, so Ctrl-C before the stream exists still counts."""

    def __init__(self) -> None:
        self.stream: Any = None
        self.cancel_requested = False
        self.printed = False
        self._tasks: set[asyncio.Task[None]] = set()

    def request_cancel(self) -> None:
        if self.cancel_requested:
            return
        self.cancel_requested = True
        if self.stream is not None:
            self._cancel()

    def started(self, stream: Any) -> None:
        self.stream = stream
        if self.cancel_requested:
            self._cancel()

    def _cancel(self) -> None:
        task = asyncio.get_running_loop().create_task(self.stream.cancel())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class Chat:
    """The REPL. ``run()`` returns the process exit status."""

    def __init__(self, url: str, token: str | None, model: str | None, stdin: TextIO, stdout: TextIO,
                 stderr: TextIO) -> None:
        self.url = url
        self.token = token
        self.model = model
        self.stdin = stdin
        self.out = stdout
        self.err = stderr
        self.interactive = stdin.isatty()
        self.color = self.interactive and stdout.isatty() and os.environ.get("NO_COLOR") is None
        self.settings = Settings()
        self.history: list[dict[str, str]] = []  # local copy of the server-held conversation
        self.loop = LoopThread()
        self.client: Client | None = None
        self._conv_ids = itertools.count(1)
        self.conversation = f"chat-{next(self._conv_ids)}"
        self.synced = False  # the server holds self.history under self.conversation

    # ------------------------------------------------------------------ output

    def _dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color else text

    def info(self, text: str) -> None:
        """Chatter (banners, stats): to stdout in a terminal, to stderr when piped so stdout holds replies only."""
        stream = self.out if self.interactive else self.err
        stream.write(self._dim(text) + "\n")
        stream.flush()

    def error(self, text: str) -> None:
        msg = f"\x1b[31merror: {text}\x1b[0m" if self.color else f"error: {text}"
        self.err.write(msg + "\n")
        self.err.flush()

    # ------------------------------------------------------------------ connection

    def connect(self) -> bool:
        """Open the session (again); report and return False when the server cannot be reached."""
        try:
            self.client = self.loop.call(Client.connect(self.url, token=self.token))
        except ServerError as exc:
            self.error(f"{exc.code}: {exc.message}")
            return False
        except Exception as exc:  # noqa: BLE001 - any failure to connect is reported the same way
            self.error(f"cannot connect to {self.url}: {exc}")
            if "auth" in str(exc) and not self.token:
                self.info("the server wants an API key: pass --token KEY or set RTWS_TOKEN")
            return False
        self.synced = False  # a new session holds no conversation yet
        self.conversation = f"chat-{next(self._conv_ids)}"
        ready = self.client.ready
        models = ", ".join(ready.models) if ready is not None else "?"
        self.info(f"connected to {self.url} · model {self.model or models} · /help for commands")
        return True

    @property
    def max_tokens_limit(self) -> int | None:
        ready = self.client.ready if self.client is not None else None
        return ready.limits.max_tokens if ready is not None else None

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        try:
            if not self.connect():
                return 1
            while True:
                line = self.read_line()
                if line is None:
                    break
                if not line.strip():
                    continue
                if line.startswith("/"):
                    if not self.command(line):
                        break
                    continue
                self.say(line)
            return 0
        finally:
            if self.client is not None:
                try:
                    self.loop.call(self.client.close(), timeout=5.0)
                except Exception:  # noqa: BLE001, S110 - closing a dead socket may fail; we are leaving anyway
                    pass
            self.loop.close()

    def read_line(self) -> str | None:
        """One line of input, or None at end of input (Ctrl-D; Ctrl-C too when stdin is not a terminal).

        Ctrl-C at an interactive prompt drops the line typed so far and asks again.
        """
        while True:
            try:
                if self.interactive:
                    return input(self._prompt())
                line = self.stdin.readline()
                return None if line == "" else line.rstrip("\n")
            except EOFError:
                if self.interactive:
                    self.out.write("\n")
                return None
            except KeyboardInterrupt:
                if not self.interactive:
                    return None
                self.out.write("\n")
                self.info("(/quit or Ctrl-D leaves)")

    def _prompt(self) -> str:
        return "\x1b[1myou>\x1b[0m " if self.color else "you> "

    def command(self, line: str) -> bool:
        """Handle a ``/command``. Returns False to leave."""
        name = line.split(maxsplit=1)[0]
        if name in ("/quit", "/exit", "/q"):
            return False
        if name in ("/help", "/?"):
            self.info(HELP)
        elif name == "/reset":
            if self.client is not None and self.synced:
                try:
                    self.loop.call(self.client.forget(self.conversation), timeout=5.0)
                except Exception:  # noqa: BLE001, S110 - a dead socket forgets everything anyway
                    pass
            self.history.clear()
            self.conversation, self.synced = f"chat-{next(self._conv_ids)}", False
            self.info("conversation cleared")
        elif name in ("/settings", "/show"):
            self.info(self.settings.describe())
        else:
            try:
                self.info(apply_command(line, self.settings, self.max_tokens_limit))
            except CommandError as exc:
                self.error(str(exc))
            except KeyError:
                self.error(f"unknown command {name}; /help lists them")
        return True

    def say(self, text: str) -> None:
        """Send one user turn (only it: the server holds the history); stream the reply.

        The server drops the oldest exchange when the history outgrows the context, and
        says how many turns in ``done.dropped``; the local copy drops the same.
        """
        if (self.client is None or self.client.closed is not None) and not self.connect():
            return
        new = {"role": "user", "content": text}
        # A server that does not hold the conversation yet (new session) gets the whole local history once.
        messages = [new] if self.synced else [*self.history, new]
        turn = _Turn()
        future = self.loop.submit(self._stream(messages, turn))
        try:
            reply = self._wait(future, turn)
        except GenerationError as exc:
            self.error(f"{exc.code}: {exc.message}")
            return
        except (ConnectionLost, ConnectionClosed, OSError) as exc:
            if turn.printed:
                self.out.write("\n")
            self.error(f"connection lost ({exc}); the next line reconnects")
            self.client = None
            return
        self.out.write("\n")
        if reply.reason == "cancelled":
            self.info("[stopped]")
        if reply.dropped:
            del self.history[:reply.dropped]
            self.info(f"(the conversation outgrew the model's context: the server dropped the oldest exchange, "
                      f"{reply.dropped} turns)")
        self.info(self._stats(reply))
        self.synced = True
        self.history += [new, {"role": "assistant", "content": reply.text}]

    def _wait(self, future: Future[Reply], turn: _Turn) -> Reply:
        """Block for the reply; Ctrl-C meanwhile cancels it (the stream then ends with reason "cancelled")."""
        while True:
            try:
                return future.result()
            except KeyboardInterrupt:
                self.loop.loop.call_soon_threadsafe(turn.request_cancel)

    async def _stream(self, messages: list[dict[str, str]], turn: _Turn) -> Reply:
        assert self.client is not None
        s = self.settings
        options: dict[str, Any] = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
                                   "stop": list(s.stop)}
        if self.model:
            options["model"] = self.model
        started = time.monotonic()
        first: float | None = None
        stream = await self.client.generate(messages=messages, conversation=self.conversation, **options)
        turn.started(stream)
        async for chunk in stream:
            if first is None:
                first = time.monotonic()
            self.out.write(chunk)
            self.out.flush()
            turn.printed = True
        usage = stream.usage
        return Reply(stream.text, stream.reason or "error", usage.prompt_tokens if usage else 0,
                     usage.completion_tokens if usage else stream.tokens,
                     None if first is None else first - started, time.monotonic() - started,
                     stream.done.dropped if stream.done is not None else 0)

    @staticmethod
    def _stats(r: Reply) -> str:
        parts = [r.reason, f"{r.completion_tokens} tokens", f"prompt {r.prompt_tokens}"]
        if r.ttft_s is not None:
            decode_s = r.elapsed_s - r.ttft_s
            if r.completion_tokens > 1 and decode_s >= 0.02:  # shorter: too few samples for a rate
                parts.append(f"{(r.completion_tokens - 1) / decode_s:.1f} tok/s")
            parts.append(f"TTFT {r.ttft_s * 1000:.0f} ms")
        return "[" + " · ".join(parts) + "]"



def main(args: Any) -> int:
    """Entry point for ``rtws chat``: ``args`` has ``url``, ``token`` (or env RTWS_TOKEN) and ``model``."""
    token = args.token or os.environ.get("RTWS_TOKEN") or None
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - importing it gives input() line editing and history
        except ImportError:
            pass
    chat = Chat(args.url, token, args.model, sys.stdin, sys.stdout, sys.stderr)
    try:
        return chat.run()
    except KeyboardInterrupt:  # Ctrl-C outside a reply and the prompt (e.g. while connecting)
        sys.stdout.write("\n")
        return 130
