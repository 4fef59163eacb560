"""rtws against its peers on the same CPU, one OpenAI-streaming client for all of them, in one run.

Servers (each started by this script on 127.0.0.1, stopped at the end):

- ``rtws /v1/completions``: ``python -m rtws serve`` (its own thread defaults unless ``--threads``);
- ``rtws /ws``: the same server process, protocol v1 over ONE shared WebSocket (``rtws.client``);
- ``transformers serve --continuous-batching`` (needs ``transformers[serving]``; ``--transformers-path`` adds
  a folder holding its extra packages, e.g. ``pip install --target DIR accelerate psutil``), skipped with a
  printed reason when it does not start;
- llama.cpp ``llama-server`` (on PATH or ``--llama-server``) with ``--gguf`` (the bundled model converted
  to an F32 GGUF, see bench/README.md), ``-np`` = the largest concurrency; skipped with a reason otherwise.

Workload, identical for every server: prompts of exactly ``--prompt-len`` tokens (32) cut from the corpus,
``max_tokens`` uniform in 16..128 (seeded), greedy (``temperature`` 0), float32 weights; a closed loop of
``c`` streams for each ``c`` in ``--concurrency`` (1,8,32). Every HTTP request opens its own connection
(llama-server drops reused connections under load, so no server gets keep-alive). Tokens are the
server's reported ``usage.completion_tokens`` (re-tokenized text where a server reports none); ITL is the
gap between successive streamed chunks of one request.

Order: ``--repeat`` repetitions per concurrency, servers in order A B C D then D C B A (ABBA); the ratio
is each server's tok/s divided by rtws ``/v1/completions``'s in the same repetition, median over
repetitions. Greedy texts are compared request by request with rtws ``/v1/completions`` at the same
concurrency; a server whose texts match for fewer than ``--min-match`` of the requests fails the check
(exit status 1).

    python bench/peers_bench.py                                    # rtws rows (+ peers found)
    python bench/peers_bench.py --llama-server /work/llama.cpp-build/bin/llama-server \\
        --gguf /work/llama.cpp-build/rtws-default-f32.gguf --transformers-path /work/peers-extra
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import REPO, corpus_text, ms, num, percentile, print_header, print_table  # noqa: E402

RTWS_HTTP = "rtws /v1/completions"
RTWS_WS = "rtws /ws (one socket)"
TRANSFORMERS = "transformers serve --cb"
LLAMA = "llama-server F32"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model folder (default: the bundled model)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated stream counts")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per run (default: max(16, 2 x concurrency))")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens-range", default="16,128", help="lo,hi of the uniform max_tokens")
    p.add_argument("--repeat", type=int, default=2, help="repetitions per concurrency (ABBA order)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every server: rtws --torch-threads, OMP_NUM_THREADS for transformers, "
                        "llama-server -t/-tb (default: each server's own default; llama-server: usable cores)")
    p.add_argument("--llama-server", default=None, help="llama-server binary (default: llama-server on PATH)")
    p.add_argument("--gguf", default=None, help="the model as GGUF for llama-server (no GGUF: no llama row)")
    p.add_argument("--transformers-path", default=None,
                   help="folder(s) prepended to PYTHONPATH for `transformers serve` (its extra packages)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers serve row")
    p.add_argument("--min-match", type=float, default=0.9,
                   help="fraction of requests whose greedy text must equal rtws's (default 0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    return p


# --------------------------------------------------------------------------- workload


def load_tokenizer(model_dir: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def make_prompts(tok: Any, n: int, prompt_len: int, seed: int) -> list[str]:
    """``n`` corpus snippets that re-encode to exactly ``prompt_len`` tokens (bounded search)."""
    text = corpus_text()
    ids = tok.encode(text[:400_000]).ids
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n * 50):
        if len(out) == n:
            break
        start = rng.randrange(0, max(1, len(ids) - prompt_len - 8))
        s = tok.decode(ids[start:start + prompt_len])
        if len(tok.encode(s).ids) == prompt_len and "\ufffd" not in s:
            out.append(s)
    if len(out) < n:
        raise RuntimeError(f"found only {len(out)} prompts of exactly {prompt_len} tokens")
    return out


@dataclass
class Outcome:
    text: str = ""
    tokens: int = 0
    ttft: float = float("nan")
    gaps: list[float] = field(default_factory=list)
    usage: bool = False


@dataclass
class RunResult:
    tok_s: float
    wall: float
    outcomes: list[Outcome]

    def gaps(self) -> list[float]:
        return [g for o in self.outcomes for g in o.gaps]

    def itl(self) -> list[float]:
        """Per request: (last chunk - first chunk) / (tokens - 1), robust to chunks read in one go."""
        return [sum(o.gaps) / (o.tokens - 1) for o in self.outcomes if o.tokens > 1 and o.gaps]


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    info: str = ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def log_tail(path: Path, n: int = 6) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def spawn(name: str, cmd: list[str], env: dict[str, str], port: int, logdir: Path) -> Server:
    log = logdir / (name.split()[0] + ".log")
    fh = open(log, "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    fh.close()
    return Server(name, proc, port, log, " ".join(cmd))


def wait_http(server: Server, path: str, timeout: float) -> None:
    """Poll ``GET path`` on the server until 200 (bounded); raise with the log tail otherwise."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"exited with {server.proc.returncode}: {log_tail(server.log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not ready after {timeout:.0f}s: {log_tail(server.log)}")


def start_rtws(model: Path, args: argparse.Namespace, logdir: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "rtws", "serve", "--host", "127.0.0.1", "--port", str(port), "--model",
           str(model), "--device", "cpu", "--dtype", "float32", "--num-slots", "64", "--log-format", "json"]
    if args.threads:
        cmd += ["--torch-threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    srv = spawn(RTWS_HTTP, cmd, env, port, logdir)
    wait_http(srv, "/health", args.start_timeout)
    for line in srv.log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "threads":
            srv.info = f"torch threads {rec.get('threads')}, interop {rec.get('interop_threads')}"
    return srv


def start_transformers(model: Path, args: argparse.Namespace, logdir: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model), "--continuous-batching",
           "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    if args.transformers_path:
        env["PYTHONPATH"] = args.transformers_path
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    srv = spawn(TRANSFORMERS, cmd, env, port, logdir)
    wait_http(srv, "/health", args.start_timeout)
    return srv


def start_llama(binary: str, gguf: str, args: argparse.Namespace, slots: int, ctx_per_slot: int,
                logdir: Path) -> Server:
    port = free_port()
    threads = args.threads or len(os.sched_getaffinity(0))
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
           "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(threads), "--no-webui",
           # the prompt is sent as text, as to every server: no BOS added (the HF tokenizer adds none)
           "--override-kv", "tokenizer.ggml.add_bos_token=bool:false"]
    srv = spawn(LLAMA, cmd, dict(os.environ), port, logdir)
    wait_http(srv, "/health", args.start_timeout)
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
        srv.info = " ".join((out.stdout + out.stderr).split())[:200]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return srv


# --------------------------------------------------------------------------- clients


async def run_openai(port: int, model_name: str | None, prompts: list[str], max_tokens: list[int],
                     concurrency: int, tok: Any) -> RunResult:
    """Closed loop of ``concurrency`` streams of ``POST /v1/completions`` (stream, usage), one connection each."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    outcomes = [Outcome() for _ in prompts]
    next_i = 0

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        body: dict[str, Any] = {"prompt": prompts[i], "max_tokens": max_tokens[i], "temperature": 0.0,
                                "stream": True, "stream_options": {"include_usage": True}}
        if model_name:
            body["model"] = model_name
        o = outcomes[i]
        parts: list[str] = []
        t0 = last = time.perf_counter()
        async with session.post(url, json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]}")
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if obj.get("usage"):
                    o.tokens = int(obj["usage"].get("completion_tokens") or 0)
                    o.usage = True
                ch = obj.get("choices") or []
                text = ch[0].get("text") or "" if ch else ""
                if text:
                    now = time.perf_counter()
                    if not parts:
                        o.ttft = now - t0
                    else:
                        o.gaps.append(now - last)
                    last = now
                    parts.append(text)
        o.text = "".join(parts)
        if not o.usage:
            o.tokens = len(tok.encode(o.text).ids)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_i
        while next_i < len(prompts):
            i = next_i
            next_i += 1
            await one(session, i)

    conn = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return RunResult(sum(o.tokens for o in outcomes) / wall, wall, outcomes)


async def run_ws(port: int, prompts: list[str], max_tokens: list[int], concurrency: int) -> RunResult:
    """The same closed loop over one shared rtws WebSocket (protocol v1, msgpack)."""
    from rtws.client import Client

    outcomes = [Outcome() for _ in prompts]
    next_i = 0
    client = await Client.connect(f"ws://127.0.0.1:{port}/ws")
    try:
        async def one(i: int) -> None:
            o = outcomes[i]
            t0 = last = time.perf_counter()
            stream = await client.generate(prompts[i], max_tokens=max_tokens[i], temperature=0.0)
            first = True
            async for _text in stream:
                now = time.perf_counter()
                if first:
                    o.ttft = now - t0
                    first = False
                else:
                    o.gaps.append(now - last)
                last = now
            o.text = stream.text
            o.tokens = stream.usage.completion_tokens if stream.usage else stream.tokens
            o.usage = True

        async def worker() -> None:
            nonlocal next_i
            while next_i < len(prompts):
                i = next_i
                next_i += 1
                await one(i)

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 600)
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    return RunResult(sum(o.tokens for o in outcomes) / wall, wall, outcomes)


# --------------------------------------------------------------------------- main


def versions() -> list[str]:
    out = []
    for mod in ("torch", "transformers", "rtws"):
        try:
            m = __import__(mod)
            out.append(f"{mod} {getattr(m, '__version__', '?')}")
        except ImportError:
            pass
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        out.append(f"rtws git {rev}")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print_header("peers_bench", args)
    from rtws.default_model import DEFAULT_MODEL_PATH

    model = Path(args.model or DEFAULT_MODEL_PATH).resolve()
    conc = [int(c) for c in args.concurrency.split(",") if c.strip()]
    lo, hi = (int(x) for x in args.max_tokens_range.split(","))
    tok = load_tokenizer(model)
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"peers_bench_{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)
    print(f"# versions: {', '.join(versions())}; server logs in {logdir}")

    servers: dict[str, Server] = {}
    skipped: dict[str, str] = {}
    try:
        servers[RTWS_HTTP] = start_rtws(model, args, logdir)
        print(f"# {RTWS_HTTP}: {servers[RTWS_HTTP].info}")
        if args.no_transformers:
            skipped[TRANSFORMERS] = "--no-transformers"
        else:
            try:
                servers[TRANSFORMERS] = start_transformers(model, args, logdir)
            except RuntimeError as e:
                skipped[TRANSFORMERS] = f"did not start: {e}"
        binary = args.llama_server or shutil.which("llama-server")
        if not binary:
            skipped[LLAMA] = "no llama-server on PATH (see bench/README.md to build one) and no --llama-server"
        elif not args.gguf:
            skipped[LLAMA] = "no --gguf (convert the model with convert_hf_to_gguf.py, see bench/README.md)"
        else:
            try:
                servers[LLAMA] = start_llama(binary, args.gguf, args, max(conc), args.prompt_len + hi + 16, logdir)
                print(f"# {LLAMA}: {servers[LLAMA].info}")
            except (RuntimeError, OSError) as e:
                skipped[LLAMA] = f"did not start: {e}"
        for name, why in skipped.items():
            print(f"# skipped {name}: {why}")
        sys.stdout.flush()

        names = [RTWS_HTTP, RTWS_WS] + [n for n in (TRANSFORMERS, LLAMA) if n in servers]
        models = {TRANSFORMERS: str(model)}
        warm = make_prompts(tok, max(conc), args.prompt_len, args.seed + 10_000)
        for name in names:  # not measured: first-request set-up (transformers builds its CB manager then)
            t0 = time.perf_counter()
            if name == RTWS_WS:
                asyncio.run(run_ws(servers[RTWS_HTTP].port, warm, [8] * len(warm), max(conc)))
            else:
                asyncio.run(run_openai(servers[name].port, models.get(name), warm[:1], [8], 1, tok))
                asyncio.run(run_openai(servers[name].port, models.get(name), warm, [8] * len(warm), max(conc), tok))
            print(f"# warm-up {name}: {time.perf_counter() - t0:.1f} s")
        rows_main: list[list[str]] = []
        results: dict[tuple[str, int], list[RunResult]] = {}
        ratios: dict[tuple[str, int], list[float]] = {}
        verdicts: list[list[str]] = []
        failed = False
        for c in conc:
            n = args.requests or max(16, 2 * c)
            rng = random.Random(args.seed + c)
            prompts = make_prompts(tok, n, args.prompt_len, args.seed + c)
            mts = [rng.randint(lo, hi) for _ in range(n)]
            for rep in range(args.repeat):
                order = names if rep % 2 == 0 else names[::-1]
                rep_tok: dict[str, float] = {}
                for name in order:
                    if name == RTWS_WS:
                        res = asyncio.run(run_ws(servers[RTWS_HTTP].port, prompts, mts, c))
                    else:
                        res = asyncio.run(run_openai(servers[name].port, models.get(name), prompts, mts, c, tok))
                    results.setdefault((name, c), []).append(res)
                    rep_tok[name] = res.tok_s
                    print(f"#   c={c} rep {rep + 1}: {name}: {num(res.tok_s)} tok/s, "
                          f"ITL p50 {ms(percentile(res.itl(), 50))} ms, {res.wall:.1f} s")
                    sys.stdout.flush()
                for name, v in rep_tok.items():
                    ratios.setdefault((name, c), []).append(v / rep_tok[RTWS_HTTP])
            ref = results[(RTWS_HTTP, c)][0].outcomes
            for name in names:
                runs = results[(name, c)]
                outs = runs[0].outcomes
                same = sum(1 for a, b in zip(outs, ref) if a.text == b.text)
                first_diff = [next((k for k, (x, y) in enumerate(zip(a.text, b.text)) if x != y),
                                   min(len(a.text), len(b.text))) for a, b in zip(outs, ref) if a.text != b.text]
                ok = same >= args.min_match * len(ref)
                failed |= not ok
                verdicts.append([name, str(c), f"{same}/{len(ref)}",
                                 str(int(statistics.median(first_diff))) if first_diff else "-",
                                 "ok" if ok else "MISMATCH",
                                 "usage" if all(o.usage for o in outs) else "re-tokenized"])
                tok_s = statistics.median(r.tok_s for r in runs)
                gaps = [g for r in runs for g in r.gaps()]
                itl = [x for r in runs for x in r.itl()]
                ttft = [o.ttft for r in runs for o in r.outcomes]
                rows_main.append([name, str(c), num(tok_s), f"{statistics.median(ratios[(name, c)]):.2f}x",
                                  " ".join(f"{x:.2f}" for x in ratios[(name, c)]), ms(percentile(itl, 50)),
                                  ms(percentile(gaps, 99)), ms(percentile(ttft, 50))])
        print_table(f"peers_bench: tok/s and ratio to {RTWS_HTTP} (same repetition; median of {args.repeat}, "
                    f"ABBA order), {args.prompt_len}-token prompts, max_tokens {lo}..{hi}, greedy, float32",
                    ["server", "streams", "tok/s", "vs rtws", "per-rep ratios", "ITL p50 ms", "chunk gap p99 ms",
                     "TTFT p50 ms"], rows_main)
        print_table(f"greedy texts vs {RTWS_HTTP} (same requests, first repetition)",
                    ["server", "streams", "equal texts", "first diff (chars, median)", "check", "tokens from"],
                    verdicts)
        for name, why in skipped.items():
            print(f"# not measured: {name}: {why}")
        return 1 if failed else 0
    finally:
        for srv in servers.values():
            srv.stop()


if __name__ == "__main__":
    sys.exit(main())
