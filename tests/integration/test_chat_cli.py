"""``rtws chat``: the terminal client, driven through a real pseudo-terminal against a real server."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.helpers.server import UNIT, RunningServer, ServerFactory

from rtws.chat import CommandError, Settings, apply_command, unescape

# --------------------------------------------------------------------------- pure parts


def test_settings_commands_change_settings() -> None:
    s = Settings()
    assert s.stop == ["\n\n"]
    assert apply_command("/temp 0.7", s) == "temperature = 0.7"
    assert apply_command("/top_p 0.9", s) == "top_p = 0.9"
    assert apply_command("/max 200", s, max_tokens_limit=4096) == "max_tokens = 200"
    assert apply_command(r"/stop \n\n END", s) == r"stop = '\n\n', 'END'"
    assert (s.temperature, s.top_p, s.max_tokens, s.stop) == (0.7, 0.9, 200, ["\n\n", "END"])
    assert apply_command("/stop", s) == "stop = none"
    assert s.stop == []


@pytest.mark.parametrize("line", ["/temp hot", "/temp -1", "/temp nan", "/top_p 0", "/top_p 1.5", "/max 0",
                                  "/max 2.5", "/max 5000"])
def test_bad_arguments_are_refused_and_change_nothing(line: str) -> None:
    s = Settings()
    with pytest.raises(CommandError):
        apply_command(line, s, max_tokens_limit=4096)
    assert s == Settings()


def test_unknown_command_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        apply_command("/frobnicate 1", Settings())


def test_unescape() -> None:
    assert unescape(r"a\nb\tc\\d\q") == "a\nb\tc\\d\\q"


# --------------------------------------------------------------------------- through a terminal


@pytest.fixture
def long_llama_dir(tiny_llama_long_dir: Path) -> Path:
    """The tiny Llama with an 8k context, so greedy decoding runs for seconds (long enough to stop it)."""
    return tiny_llama_long_dir


@pytest.fixture
def long_server(server_factory: ServerFactory, long_llama_dir: Path) -> RunningServer:
    return server_factory(long_llama_dir, num_slots=4, max_seq_len=4400)


class Terminal:
    """A child process on a pseudo-terminal; ``expect`` reads until a regex matches what came after the last match."""

    def __init__(self, argv: list[str]) -> None:
        env = {**os.environ, "TERM": "dumb", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
        pid, fd = pty.fork()
        if pid == 0:  # child
            os.execve(argv[0], argv, env)
        self.pid, self.fd = pid, fd
        self.buf = b""
        self.pos = 0
        self.eof = False

    def _read(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        ready, _, _ = select.select([self.fd], [], [], left)
        if not ready:
            raise TimeoutError
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            self.eof = True
        self.buf += data

    def expect(self, pattern: str, timeout: float = 10 * UNIT) -> re.Match[bytes]:
        rx = re.compile(pattern.encode(), re.DOTALL)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf, self.pos)
            if m:
                self.pos = m.end()
                return m
            if self.eof:
                raise AssertionError(f"EOF before {pattern!r}; output: {self.buf[self.pos:]!r}")
            try:
                self._read(deadline)
            except TimeoutError:
                raise AssertionError(f"timed out waiting for {pattern!r}; output: {self.buf[self.pos:]!r}") from None

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 10 * UNIT) -> int:
        """Read to EOF, then reap the child; returns its exit status."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            self._read(deadline)
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


STATS = r"\[(stop|length|cancelled) · (\d+) tokens · prompt (\d+)"


def test_chat_streams_ctrl_c_cancels_and_chat_goes_on(long_server: RunningServer, long_llama_dir: Path) -> None:
    term = Terminal([sys.executable, "-m", "rtws", "chat", long_server.url])
    try:
        term.expect(r"connected to .* · model " + re.escape(long_llama_dir.name))
        term.expect(r"you> ")
        for line, answer in (("/temp 0", "temperature = 0"), ("/stop", "stop = none"), ("/max 4000", "max_tokens = 4000")):
            term.send(line + "\r")
            term.expect(re.escape(answer))
            term.expect(r"you> ")
        term.send("But soft, what light?\r")
        term.expect(r"what light\?\r\n.{40}", timeout=20 * UNIT)  # the reply is streaming
        term.send("\x03")  # Ctrl-C
        term.expect(r"\[stopped\]")
        m = term.expect(STATS)
        assert m.group(1) == b"cancelled"
        first_tokens, first_prompt = int(m.group(2)), int(m.group(3))
        assert 0 < first_tokens < 4000
        # The cancel reached the server: its engine has nothing left to run.
        assert long_server.engine().wait_idle(5 * UNIT)
        term.expect(r"you> ")  # still in the chat

        term.send("/max 8\r")
        term.expect(r"max_tokens = 8")
        term.send("Speak again.\r")
        m = term.expect(STATS)
        assert m.group(1) in (b"stop", b"length") and int(m.group(2)) <= 8
        # The history went with it: the first exchange is part of this prompt.
        assert int(m.group(3)) > first_prompt + first_tokens // 2

        term.send("/reset\r")
        term.expect(r"conversation cleared")
        term.send("Speak again.\r")
        m = term.expect(STATS)
        assert int(m.group(3)) < first_prompt + 10
        term.send("/quit\r")
        assert term.wait() == 0
    finally:
        term.kill()


def test_ctrl_c_at_the_prompt_does_not_leave(long_server: RunningServer) -> None:
    term = Terminal([sys.executable, "-m", "rtws", "chat", long_server.url])
    try:
        term.expect(r"you> ")
        term.send("half a line\x03")
        term.expect(r"/quit or Ctrl-D leaves")
        term.expect(r"you> ")
        term.send("/max 3\r")
        term.expect(r"max_tokens = 3")
        term.send("Hello\r")
        term.expect(STATS)
        term.expect(r"you> ")
        term.send("\x04")  # Ctrl-D
        assert term.wait() == 0
    finally:
        term.kill()


def test_piped_stdin_works_line_by_line(long_server: RunningServer) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rtws", "chat", long_server.url],
        check=False, input="/max 5\nHello there\n/bogus\nAnd again\n",
        capture_output=True, text=True,
        timeout=30 * UNIT, env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    # Chatter goes to stderr; stdout holds the two replies only.
    assert len(re.findall(STATS, proc.stderr)) == 2
    assert "unknown command /bogus" in proc.stderr
    assert "you>" not in proc.stdout and "connected" not in proc.stdout
    assert proc.stdout.count("\n") >= 2


def test_token_is_sent_and_a_wrong_one_is_reported(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    rs = server_factory(tiny_llama_dir, api_keys=("sekrit",))
    base = [sys.executable, "-m", "rtws", "chat", rs.url]
    ok = subprocess.run([*base, "--token", "sekrit"], check=False, input="/max 3\nHi\n", capture_output=True, text=True,
                        timeout=30 * UNIT)
    assert ok.returncode == 0 and re.search(STATS, ok.stderr), ok.stderr
    env = {**os.environ, "RTWS_TOKEN": "wrong"}
    bad = subprocess.run(base, check=False, input="Hi\n", capture_output=True, text=True, timeout=30 * UNIT, env=env)
    assert bad.returncode == 1
    assert "unauthorized" in bad.stderr and "Traceback" not in bad.stderr


def test_unreachable_server_exits_with_an_error(unused_port: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rtws", "chat", f"ws://127.0.0.1:{unused_port}/ws"],
        check=False, input="", capture_output=True, text=True, timeout=30 * UNIT,
    )
    assert proc.returncode == 1
    assert "cannot connect" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_history_slides_when_the_conversation_outgrows_the_context(server_factory: ServerFactory,
                                                                   long_llama_dir: Path) -> None:
    rs = server_factory(long_llama_dir, max_prompt_tokens=60)
    proc = subprocess.run(
        [sys.executable, "-m", "rtws", "chat", rs.url], check=False,
        input="/temp 0\n/max 20\nFirst line.\nSecond line.\nThird line.\nFourth line.\n",
        capture_output=True, text=True, timeout=30 * UNIT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "dropped the oldest exchange" in proc.stderr
    prompts = [int(m.group(3)) for m in re.finditer(STATS, proc.stderr)]
    assert len(prompts) == 4 and max(prompts) <= 60 and "error" not in proc.stderr
