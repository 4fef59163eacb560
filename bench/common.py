"""Shared pieces of the rtws benchmarks: statistics, tables, workloads, the engine driver, a server child.

Benchmarks are scripts, not tests: each one prints its figures next to a
baseline measured in the same run, because absolute timings on a shared
machine are noise. This module imports no torch at module level, so the
load-generator processes (which import it) start quickly; the functions that
need the model import it when called.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtws.default_model.corpus import corpus_text as corpus_text  # re-exported: the scripts import it from here

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


# --------------------------------------------------------------------------- statistics and tables


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    if len(s) == 1:
        return float(s[0])
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (k - lo))


def ms(seconds: float) -> str:
    """Seconds as a short millisecond string (``-`` for NaN)."""
    if seconds != seconds:
        return "-"
    v = seconds * 1000.0
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def num(v: float, digits: int = 0) -> str:
    if v != v:
        return "-"
    return f"{v:,.{digits}f}"


def ratio(a: float, b: float) -> str:
    if b <= 0 or a != a or b != b:
        return "-"
    return f"{a / b:.2f}x"


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A compact fixed-width table (Markdown-compatible pipes)."""
    body = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    print(f"\n{title}")
    print(line(list(headers)))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in body:
        print(line(r))
    sys.stdout.flush()


def parse_tables(text: str) -> dict[str, list[list[str]]]:
    """The tables :func:`print_table` printed in ``text``: title -> rows of stripped cells (headers excluded)."""
    lines = text.splitlines()
    out: dict[str, list[list[str]]] = {}
    for i in range(len(lines) - 2):
        if lines[i + 1].startswith("| ") and lines[i + 2].startswith("|-") and not lines[i].startswith("|"):
            rows = []
            for row in lines[i + 3:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            out[lines[i].strip()] = rows
    return out


def machine_info() -> str:
    """One line: CPU model, cores, memory, GPU (if torch is already imported and sees one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    gpu = "no GPU"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores{mem}, {gpu}, load {load:.1f}, python {platform.python_version()}"


def print_header(name: str, args: Any) -> None:
    print(f"# {name}  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"# machine: {machine_info()}")
    print(f"# command: {' '.join([Path(sys.argv[0]).name if sys.argv else name, *sys.argv[1:]])}")
    print(f"# args: {json.dumps(vars(args), default=str)}")
    sys.stdout.flush()


def raise_nofile(want: int) -> int:
    """Raise the open-files soft limit towards ``want`` (up to the hard limit); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (``VmRSS`` from /proc), 0 if unavailable."""
    try:
        for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (from /proc/<pid>/stat)."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (a server and its engine processes), from /proc/<pid>/task/*/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                pass
    return out


# --------------------------------------------------------------------------- workloads


def prompt_ids(tokenizer: Any, n: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of exactly ``prompt_len`` token ids, cut from the corpus at seeded offsets."""
    text = corpus_text()
    rng = random.Random(seed)
    ids: list[int] = tokenizer(text[:400_000], add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < prompt_len + 1:
        ids = ids * (prompt_len // max(1, len(ids)) + 2)
    out = []
    for _ in range(n):
        start = rng.randrange(0, len(ids) - prompt_len)
        out.append(ids[start:start + prompt_len])
    return out


def text_prompts(tokenizer: Any, n: int, prompt_len: int, seed: int = 0) -> list[str]:
    """``n`` text prompts of about ``prompt_len`` tokens (corpus slices, decoded)."""
    return [tokenizer.decode(p) for p in prompt_ids(tokenizer, n, prompt_len, seed)]


def max_tokens_list(n: int, max_tokens: int, mixed: bool, lo: int = 16, hi: int = 256, cap: int | None = None,
                    seed: int = 1) -> list[int]:
    """Per-request ``max_tokens``: all ``max_tokens``, or uniform in ``lo..hi`` (seeded) when ``mixed``.

    ``cap`` (the model's context minus the prompt) clips every value.
    """
    rng = random.Random(seed)
    vals = [rng.randint(lo, hi) for _ in range(n)] if mixed else [max_tokens] * n
    if cap is not None:
        vals = [max(1, min(v, cap)) for v in vals]
    return vals


# --------------------------------------------------------------------------- models and the engine


def add_model_args(p: Any, *, default_concurrency: int = 32) -> None:
    from rtws.default_model import DEFAULT_MODEL_PATH

    p.add_argument("--model", default=str(DEFAULT_MODEL_PATH),
                   help="model folder, hub id, gpt2-random or llama-random (default: the bundled model)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16")
    p.add_argument("--concurrency", type=int, default=default_concurrency, help="concurrent streams")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt length in tokens")
    p.add_argument("--num-slots", type=int, default=None, help="engine KV slots (default: max(64, concurrency))")
    p.add_argument("--prefill-budget", type=int, default=256, help="prompt tokens per engine step")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads here and in a server child (OMP_NUM_THREADS; default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", default="off", choices=("auto", "on", "off"),
                   help="torch.compile the small-batch greedy decode step, in-process engines and server children "
                        "alike (rtws serve's own default: auto)")
    p.add_argument("--engine-process", default="auto", choices=("auto", "on", "off"),
                   help="server children run each engine in a process of its own (rtws serve's default: auto, "
                        "on for the bundled model on a CPU with 2+ cores)")


def slots_for(args: Any, concurrency: int | None = None) -> int:
    return args.num_slots or max(64, concurrency if concurrency is not None else args.concurrency)


def load_served(args: Any, num_slots: int, max_seq_len: int | None = None) -> Any:
    """Load the model exactly as the server does (``rtws.model.load``); returns a ServedModel."""
    import torch

    from rtws.model import ModelSpec, load

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ModelSpec(name="bench", path=str(args.model), device=args.device, dtype=args.dtype,
                     num_slots=num_slots, prefill_budget=args.prefill_budget, max_seq_len=max_seq_len,
                     compile=getattr(args, "compile", "off"))
    return load(spec)


@dataclass(slots=True)
class RunStats:
    """What one workload run measured. Times in seconds."""

    label: str
    wall: float = 0.0
    tokens: int = 0
    requests: int = 0
    itl: list[float] = field(default_factory=list)  # per-token latency samples
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else float("nan")


async def run_engine(engine: Any, prompts: Sequence[list[int]], max_tokens: Sequence[int], concurrency: int, *,
                     ignore_eos: bool = True, temperature: float = 0.0, label: str = "rtws engine",
                     timeout: float = 3600.0) -> RunStats:
    """Drive a started rtws Engine closed-loop: ``concurrency`` requests in flight until all are done.

    Per-token latency: the gap between successive events of one request,
    divided by the tokens the later event carries (an event may carry several
    tokens when some produced no text yet).
    """
    from rtws.generation import SamplingParams

    loop = asyncio.get_running_loop()
    done = loop.create_future()
    st = RunStats(label=label)
    n = len(prompts)
    next_i = 0
    finished = 0
    clock = time.perf_counter

    def submit(i: int) -> None:
        t_submit = clock()
        last = [t_submit]
        first = [True]

        def sink(ev: Any) -> None:
            nonlocal finished
            now = clock()
            if ev.tokens:
                if first[0]:
                    st.ttft.append(now - t_submit)
                    first[0] = False
                    if ev.tokens > 1:
                        st.itl.extend([(now - t_submit) / ev.tokens] * (ev.tokens - 1))
                else:
                    st.itl.extend([(now - last[0]) / ev.tokens] * ev.tokens)
                last[0] = now
                st.tokens += ev.tokens
            if ev.finish is not None:
                st.e2e.append(now - t_submit)
                st.reasons[ev.finish] = st.reasons.get(ev.finish, 0) + 1
                finished += 1
                refill()

        params = SamplingParams(max_tokens=max_tokens[i], temperature=temperature, seed=i, ignore_eos=ignore_eos)
        engine.submit(prompts[i], params, sink)

    def refill() -> None:
        nonlocal next_i
        if finished == n:
            if not done.done():
                done.set_result(None)
            return
        if next_i < n:
            i = next_i
            next_i += 1
            submit(i)

    t0 = clock()
    for _ in range(min(concurrency, n)):
        refill()
    await asyncio.wait_for(done, timeout)
    st.wall = clock() - t0
    st.requests = n
    return st


def run_generate(model: Any, prompts: Sequence[list[int]], max_tokens: Sequence[int], concurrency: int,
                 pad_id: int, label: str = "model.generate") -> RunStats:
    """Static batching baseline: batches of ``concurrency`` prompts, left-padded, each run to completion.

    A batch runs to its longest member's ``max_tokens`` (``min_new_tokens``
    equal to it, so EOS cannot end it early); only the tokens each request
    asked for count as useful. Per-token latency: batch wall time / steps.
    """
    import torch

    st = RunStats(label=label)
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for b in range(0, len(prompts), concurrency):
        batch = prompts[b:b + concurrency]
        mt = max_tokens[b:b + concurrency]
        steps = max(mt)
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                                 do_sample=False, pad_token_id=pad_id)
        sync()
        dt = time.perf_counter() - t0
        produced = out.shape[1] - width
        if produced != steps:
            raise RuntimeError(f"generate produced {produced} tokens, expected {steps}")
        st.wall += dt
        st.tokens += sum(mt)
        st.requests += len(batch)
        st.itl.extend([dt / steps] * steps)
        st.e2e.extend([dt] * len(batch))
        st.ttft.extend([dt / steps] * len(batch))  # lower bound: static batching returns all at once
    st.extra["padded_tokens"] = sum(
        max(max_tokens[b:b + concurrency]) * len(max_tokens[b:b + concurrency]) for b in range(0, len(max_tokens),
                                                                                               concurrency))
    return st


def pad_token_id(served: Any) -> int:
    tok = served.tokenizer
    for v in (tok.pad_token_id, tok.eos_token_id, getattr(served.model.config, "eos_token_id", None)):
        if isinstance(v, int):
            return v
    return 0


# --------------------------------------------------------------------------- the server in a child process


class ServerProcess:
    """A real rtws server (``bench/serve_child.py``) in a child process, with a control pipe.

    The child builds the app exactly like ``rtws serve`` does and adds an
    event-loop lag sampler; over its stdin/stdout it answers ``stats`` and
    ``lag_reset`` commands with one JSON line each. No HTTP endpoint is added.
    """

    def __init__(self, config: dict[str, Any], *, log_path: Path | None = None, timeout: float = 600.0,
                 env: dict[str, str] | None = None) -> None:
        cfg = {"port": 0, "log_level": "WARNING", **config}
        self.config = cfg
        self.log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"rtws-bench-{os.getpid()}-{id(self)}.log"
        self._log = open(self.log_path, "wb")
        child_env = dict(os.environ)
        child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
        child_env.setdefault("HF_HUB_OFFLINE", "1")
        child_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "serve_child.py"), json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=child_env, text=True, bufsize=1,
        )
        self._lock = threading.Lock()
        self.pid: int = self.proc.pid
        ready = self._read_line(timeout)
        if ready.get("event") != "ready":
            tail = self.log_tail()
            self.stop(timeout=5.0)
            raise RuntimeError(f"server child did not start: {ready}; log: {tail}")
        self.port: int = int(ready["port"])

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def _read_line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        result: list[str] = []

        def reader() -> None:
            assert self.proc.stdout is not None
            result.append(self.proc.stdout.readline())

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(timeout)
        if not result or not result[0]:
            return {"event": "eof", "returncode": self.proc.poll()}
        return json.loads(result[0])  # type: ignore[no-any-return]

    def command(self, cmd: str, timeout: float = 60.0) -> dict[str, Any]:
        """Send one control command; return the child's JSON answer."""
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            return self._read_line(timeout)

    def rss_kib(self) -> int:
        """The server's resident memory, its engine processes included."""
        return sum(rss_kib(p) for p in process_tree(self.pid))

    def cpu_seconds(self) -> float:
        """CPU seconds of the server and its live engine processes (both sides of ``--engine-process``)."""
        return sum(cpu_seconds(p) for p in process_tree(self.pid))

    def engine_pids(self) -> list[int]:
        return process_tree(self.pid)[1:]

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """Structured log lines of the child with ``"event": event``."""
        out = []
        try:
            for ln in self.log_path.read_text(errors="replace").splitlines():
                if f'"{event}"' in ln:
                    try:
                        d = json.loads(ln)
                    except ValueError:
                        continue
                    if d.get("event") == event:
                        out.append(d)
        except OSError:
            pass
        return out

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # the child exits when its control pipe closes
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout)
        for f in (self.proc.stdout,):
            if f is not None:
                f.close()
        self._log.close()
        try:
            self.log_path.unlink()
        except OSError:
            pass

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def thread_env(args: Any) -> dict[str, str]:
    """Environment for a server child that uses ``--threads`` torch threads (empty: torch's default)."""
    threads = getattr(args, "threads", None)
    return {"OMP_NUM_THREADS": str(threads)} if threads else {}


def server_config(args: Any, **overrides: Any) -> dict[str, Any]:
    """ServerConfig overrides for a bench server from the common model arguments."""
    cfg: dict[str, Any] = {"model": str(args.model), "device": args.device, "dtype": args.dtype,
                           "prefill_budget": args.prefill_budget, "compile": getattr(args, "compile", "off"),
                           "engine_process": getattr(args, "engine_process", "auto")}
    cfg.update(overrides)
    return cfg


def lag_row(label: str, lag: dict[str, Any]) -> list[str]:
    return [label, ms(lag.get("p50", float("nan"))), ms(lag.get("p99", float("nan"))),
            ms(lag.get("max", float("nan"))), str(lag.get("samples", 0))]
