"""The engine process's entry point: ``python -m rtws.engine_child <command fd> <event fd>``.

Started by :class:`rtws.engine_process.RemoteEngine` (a fresh interpreter; the two pipe ends are passed as
inherited file descriptors). It reads the ``init`` message (the ModelSpec, torch threads, log settings),
loads the model with an in-process :class:`~rtws.engine_process.PipedEngine`, reports ``ready`` (or the load's
exception) and runs the engine loop on its main thread until the command pipe closes. Separate from
``rtws.engine_process`` so that the server side imports nothing of the model loader.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import pickle
import signal
import sys
from typing import Any

from .engine_process import PipedEngine, _frame, _FrameReader, _write_all
from .logs import setup_logging
from .model import load
from .threads import ElasticThreads, SpareCore, ThreadChoice, apply_threads, usable_cores


def _picklable(exc: BaseException) -> BaseException:
    try:
        out = pickle.loads(pickle.dumps(exc))
        return out if isinstance(out, BaseException) else RuntimeError(repr(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def main(rfd: int, wfd: int) -> None:
    """The child process: read the init message, load the spec (in-process engine), report ``ready``, run the loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server drains, then stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    init = None
    reader = _FrameReader(rfd)
    while init is None:
        msgs = reader.read()
        if msgs is None:  # the server went away before sending the spec
            os._exit(0)
        init = msgs[0] if msgs else None
    _, spec, threads, log_level, log_format, steps = init
    setup_logging(log_level, fmt=log_format)
    try:
        apply_threads(ThreadChoice(threads[0], threads[1], "the server's choice"))
        served = load(dataclasses.replace(spec, engine_process="off"), engine_cls=PipedEngine)
    except BaseException as exc:
        _write_all(wfd, _frame(("error", _picklable(exc))))
        os._exit(0)
    engine = served.engine
    assert isinstance(engine, PipedEngine)
    engine.attach(rfd, wfd, steps)
    runner: Any = engine.runner
    top = threads[2] if len(threads) > 2 else None
    if top is not None and threads[0] is not None and top > threads[0] and hasattr(runner, "elastic"):
        min_rows = runner.elastic_min_rows(threads[0], top)
        if min_rows is not None:
            runner.elastic = ElasticThreads(threads[0], top, SpareCore(usable_cores()), min_rows=min_rows)
    model: Any = served.model
    engine.send(("ready", {
        "pid": os.getpid(), "context_len": served.context_len, "device": served.device,
        "dtype": str(getattr(model, "dtype", spec.dtype)), "config": getattr(model, "config", None),
        "kv_capacity_tokens": engine.kv_capacity_tokens, "stats": engine.stats(),
        "runner": {k: getattr(runner, k, None) for k in (
            "num_blocks", "block_size", "kv_cache_bytes", "compile_choice", "compile_reason", "cpu_gemm",
            "cpu_gemm_reason")},
    }))
    code = 0
    gc.collect()
    gc.freeze()  # the model, torch and transformers live as long as this process: keep them out of full collections
    try:
        engine._run()
    except BaseException:  # logged by the loop ("engine loop crashed"); the server fails the live generations
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
