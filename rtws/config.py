"""Server configuration: one frozen dataclass, read from arguments, ``RTWS_*`` variables and CLI flags.

Precedence, highest first: explicit arguments (constructor keywords or CLI
flags given on the command line) > ``RTWS_<FIELD>`` environment variables >
the defaults below. Validation raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("auto", "text", "json")
QUANTIZATIONS = ("none", "int8", "int4")  # weight-only, through torchao (rtws.quant); int4 needs CUDA


@dataclass(frozen=True, slots=True)
class ServerConfig:
    # --- network
    host: str = field(default="127.0.0.1", metadata={"help": "interface to bind"})
    port: int = field(default=8000, metadata={"help": "TCP port (0 picks a free one)"})
    # --- model (the default model when no registry is given)
    model: str | None = field(default=None, metadata={
        "help": "model folder or hub id; default: the bundled Shakespeare model"})
    model_name: str | None = field(default=None, metadata={"help": "name clients use for the model"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    quantization: str = field(default="none", metadata={
        "help": "weight-only quantization: none, int8 (CPU or CUDA) or int4 (CUDA); needs rtws[quant]"})
    # --- engine
    num_slots: int = field(default=64, metadata={"help": "KV-cache slots: generations decoded at once per model"})
    max_seq_len: int | None = field(default=None, metadata={
        "help": "tokens per slot (prompt + completion); default: the model's context"})
    prefill_budget: int = field(default=256, metadata={"help": "prompt tokens prefilled per engine step, at most"})
    max_batch_size: int | None = field(default=None, metadata={
        "help": "running generations per model, at most (default: num_slots)"})
    max_batch_wait_ms: float = field(default=0.0, metadata={
        "help": "when idle, wait up to this long to group new requests into one batch"})
    priority_aging_s: float = field(default=2.0, metadata={
        "help": "a waiting request gains one priority level per this many seconds"})
    torch_threads: int | None = field(default=None, metadata={
        "help": "torch intra-op threads (default on CPU for rtws serve: cores - 1 from 2 cores, else cores)"})
    torch_interop_threads: int | None = field(default=None, metadata={
        "help": "torch inter-op threads (default on CPU for rtws serve: 1)"})
    elastic_threads: bool = field(default=True, metadata={
        "help": "with the default torch threads and the engine in its own process, an uncompiled step may use "
                "the event loop's core too while the machine leaves a core idle (--no-elastic-threads: never)"})
    cuda_graphs: bool = field(default=True, metadata={
        "help": "on CUDA, decode with static shapes replayed from CUDA graphs (one per batch-size bucket)"})
    warmup: bool = field(default=True, metadata={"help": "run a real generation before serving"})
    kv_cache_gb: float | None = field(default=None, metadata={
        "help": "KV block pool size in GiB per model (default: 1 on CPU; on CUDA 0.7 of the memory free after the "
                "weights)"})
    prefix_cache: bool = field(default=True, metadata={
        "help": "reuse the KV blocks of identical prompt prefixes (--no-prefix-cache turns it off)"})
    block_size: int = field(default=16, metadata={"help": "token positions per KV block"})
    compile: str = field(default="auto", metadata={
        "help": "torch.compile the greedy decode step of small batches on CPU at warm-up: auto (models of 1M+ "
                "parameters, kept per shape only where timing shows a gain), on or off"})
    cpu_gemm: str = field(default="auto", metadata={
        "help": "the decode step's linear layers on CPU: auto (oneDNN with weights packed at load, for float32 "
                "models of 1M+ parameters where warm-up timing shows a gain), onednn, or default (torch's GEMM)"})
    engine_process: str = field(default="auto", metadata={
        "help": "run each model's engine in a process of its own, so that it shares no GIL with the event loop: "
                "auto (CPU, 2+ cores, models with 4 MB+ of weights), on or off"})
    # --- sessions and limits
    max_connections: int = field(default=1024, metadata={"help": "open WebSocket + HTTP streams, at most"})
    max_generations_per_session: int = field(default=64, metadata={"help": "live generations per socket"})
    max_tokens_limit: int = field(default=4096, metadata={"help": "largest max_tokens a request may ask"})
    max_prompt_tokens: int | None = field(default=None, metadata={
        "help": "longest prompt in tokens (default: the model's context - 1)"})
    max_frame_bytes: int = field(default=1 << 20, metadata={"help": "largest incoming frame (close 1009 above)"})
    send_high_watermark: int = field(default=256 * 1024, metadata={
        "help": "per-socket send buffer bytes above which its generations pause"})
    send_low_watermark: int | None = field(default=None, metadata={
        "help": "resume below this many buffered bytes (default: high // 4)"})
    transport_high_water: int = field(default=64 * 1024, metadata={
        "help": "bytes the socket's transport buffers before the writer waits (asyncio write high-water mark)"})
    socket_send_buffer: int | None = field(default=None, metadata={
        "help": "kernel SO_SNDBUF for WebSockets in bytes (default: the OS's autotuning)"})
    stall_timeout_s: float = field(default=30.0, metadata={
        "help": "close a socket (1008) whose reader has not taken data for this long"})
    request_timeout: float | None = field(default=None, metadata={
        "help": "seconds before a generation ends with reason 'timeout' (default: none)"})
    idle_timeout_s: float | None = field(default=600.0, metadata={
        "help": "close a session with no live generation and no frame for this long"})
    ping_interval_s: float | None = field(default=20.0, metadata={"help": "WebSocket keepalive ping interval"})
    ping_timeout_s: float | None = field(default=20.0, metadata={"help": "close if a ping is unanswered this long"})
    rate_limit_per_minute: int | None = field(default=None, metadata={
        "help": "generations per client per minute (token bucket; default: unlimited)"})
    rate_limit_burst: int | None = field(default=None, metadata={
        "help": "token bucket size (default: rate_limit_per_minute / 6, at least 1)"})
    resume_window_s: float = field(default=30.0, metadata={
        "help": "hold an acking session this long after its socket drops uncleanly, for resume (0: off)"})
    max_conversations_per_session: int = field(default=16, metadata={
        "help": "server-held conversations per session, at most"})
    max_generations_per_conversation: int = field(default=1, metadata={
        "help": "generations running at once on one conversation, at most"})
    require_ack: bool | None = field(default=None, metadata={
        "help": "every /ws session acks from its first frame (ready.limits.ack_required): flow control that "
                "does not need send to block, for buffering proxies; default (none): off for rtws serve, "
                "on under rtws.ray / rtws serve-ray"})
    # --- security
    api_keys: tuple[str, ...] = field(default=(), metadata={
        "help": "API keys (comma-separated in RTWS_API_KEYS); empty: auth off"})
    admin_api_keys: tuple[str, ...] = field(default=(), metadata={
        "help": "keys for admin endpoints (default: the API keys)"})
    allowed_origins: tuple[str, ...] = field(default=(), metadata={
        "help": "Origins allowed to open browser WebSockets; empty: any"})
    # --- hostile clients (docs/operations.md, "Hostile clients")
    auth_timeout_s: float = field(default=5.0, metadata={
        "help": "close (1008) a WebSocket that has not authenticated within this many seconds"})
    max_preauth_connections: int = field(default=64, metadata={
        "help": "WebSockets still waiting for hello {token}, at most (their own budget, outside max_connections)"})
    max_connections_per_client: int | None = field(default=None, metadata={
        "help": "open WebSockets per client (API key when verified, else address); default: no cap"})
    max_generations_per_client: int | None = field(default=None, metadata={
        "help": "queued + running generations per client across its sockets and HTTP; default: no cap"})
    max_control_bytes: int = field(default=256 * 1024, metadata={
        "help": "unsent control/error frame bytes per socket; past it the socket is closed 1008"})
    reader_lead_bytes: int = field(default=8 * 1024, metadata={
        "help": "a socket's generations pause while its reader has not taken this many bytes already written to "
                "the socket (transport buffer + the kernel's send queue), or what it took in the last second if "
                "that is more; directly served, non-acking sockets (0: off)"})
    max_transport_buffer: int = field(default=1 << 20, metadata={
        "help": "bytes a socket's transport may hold unsent (pongs, frames); past it the socket is closed 1008"})
    ping_rate_per_s: float = field(default=10.0, metadata={
        "help": "client pings answered per second per socket (burst ping_burst); past it the socket is closed 1008"})
    ping_burst: int = field(default=50, metadata={"help": "client pings allowed in a burst"})
    ws_frames_per_s: float = field(default=200.0, metadata={
        "help": "inbound WebSocket frames per socket per second, sustained; past it the server stops reading "
                "that socket until its budget refills (burst ws_frame_burst)"})
    ws_frame_burst: int = field(default=1000, metadata={"help": "inbound WebSocket frames allowed in a burst"})
    abuse_cooldown_s: float = field(default=5.0, metadata={
        "help": "after a WebSocket is closed for a ping flood or a full send buffer, upgrades with the same "
                "address + Authorization + subprotocol headers get 429 for this many seconds (0: off)"})
    stall_min_bytes_per_s: int = field(default=64 * 1024, metadata={
        "help": "a socket blocked on its reader for most of a stall_timeout_s window that took fewer bytes/s "
                "than this is closed 1008"})
    prompt_chars_per_token: int = field(default=32, metadata={
        "help": "refuse prompts longer than max_prompt_tokens x this many characters before tokenizing"})
    header_timeout_s: float = field(default=10.0, metadata={
        "help": "close a connection whose request headers (or WebSocket upgrade) are not complete in this time"})
    body_timeout_s: float = field(default=30.0, metadata={
        "help": "answer 408 when a request body is not fully received in this time"})
    max_raw_connections: int | None = field(default=4096, metadata={
        "help": "TCP connections at once, any state (refused at accept past it); separate from max_connections"})
    max_connections_per_address: int | None = field(default=None, metadata={
        "help": "TCP connections at once per peer address; default: no cap (NAT and proxies share addresses)"})
    forwarded_allow_ips: tuple[str, ...] = field(default=(), metadata={
        "help": "proxies trusted for X-Forwarded-For/-Proto (comma-separated IPs or CIDRs); default: none"})
    allowed_hosts: tuple[str, ...] = field(default=(), metadata={
        "help": "Host header values accepted (DNS-rebinding guard), e.g. localhost,127.0.0.1; empty: any"})
    metrics_api_keys: tuple[str, ...] = field(default=(), metadata={
        "help": "keys for GET /metrics (default: the API keys when auth is on; open when auth is off)"})
    # --- operations
    drain_timeout_s: float = field(default=30.0, metadata={
        "help": "on SIGTERM, let generations finish this long before cancelling them"})
    enable_metrics: bool = field(default=True, metadata={"help": "serve Prometheus metrics on /metrics"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    log_format: str = field(default="auto", metadata={
        "help": "auto (readable lines on a TTY, JSON lines otherwise), text or json"})
    access_log: bool = field(default=False, metadata={"help": "uvicorn access log"})
    replica_id: str | None = field(default=None, metadata={
        "help": "name of this server announced in ready.replica and rtws_replica_info (rtws.ray sets one per replica)"})

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def low_watermark(self) -> int:
        return self.send_low_watermark if self.send_low_watermark is not None else self.send_high_watermark // 4

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_sources(cls, explicit: Mapping[str, Any] | None = None,
                     env: Mapping[str, str] | None = None) -> ServerConfig:
        """Build from explicit values over ``RTWS_*`` variables over defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = "RTWS_" + f.name.upper()
            if key in env:
                values[f.name] = parse_value(f.name, field_type(f.name), env[key])
        for k, v in (explicit or {}).items():
            if k not in FIELD_NAMES:
                raise ValueError(f"{k}: unknown configuration field")
            values[k] = v
        return cls(**values)


FIELD_NAMES = frozenset(f.name for f in fields(ServerConfig))
_HINTS = typing.get_type_hints(ServerConfig)


def field_type(name: str) -> Any:
    return _HINTS[name]


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for ``X | None`` annotations."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def parse_value(name: str, tp: Any, raw: str) -> Any:
    """Parse a string (environment variable or CLI flag) into the field's type."""
    base, optional = _base_type(tp)
    text = raw.strip()
    if optional and text.lower() in ("", "none", "null"):
        return None
    try:
        if base is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if typing.get_origin(base) is tuple:
            return tuple(p.strip() for p in text.split(",") if p.strip())
        return text
    except ValueError:
        raise ValueError(f"{name}: cannot parse {raw!r} as {getattr(base, '__name__', base)}") from None


def _validate(c: ServerConfig) -> None:
    def need(cond: bool, name: str, what: str) -> None:
        if not cond:
            raise ValueError(f"{name}: {what} (got {getattr(c, name)!r})")

    for f in fields(c):
        v = getattr(c, f.name)
        base, optional = _base_type(_HINTS[f.name])
        if v is None:
            need(optional, f.name, "must not be None")
            continue
        if base is bool:
            need(isinstance(v, bool), f.name, "must be a bool")
        elif base is int:
            need(isinstance(v, int) and not isinstance(v, bool), f.name, "must be an int")
        elif base is float:
            need(isinstance(v, (int, float)) and not isinstance(v, bool), f.name, "must be a number")
            need(v == v and v not in (float("inf"), float("-inf")), f.name, "must be finite")
        elif base is str:
            need(isinstance(v, str), f.name, "must be a string")
        elif typing.get_origin(base) is tuple:
            need(isinstance(v, tuple) and all(isinstance(x, str) for x in v), f.name, "must be a tuple of strings")
    need(0 <= c.port <= 65535, "port", "must be in 0..65535")
    for name in ("num_slots", "prefill_budget", "max_connections", "max_generations_per_session",
                 "max_tokens_limit", "max_frame_bytes", "send_high_watermark", "max_conversations_per_session",
                 "max_generations_per_conversation"):
        need(getattr(c, name) >= 1, name, "must be >= 1")
    need(c.transport_high_water >= 1024, "transport_high_water", "must be >= 1024")
    for name in ("torch_threads", "torch_interop_threads", "socket_send_buffer", "max_seq_len", "max_batch_size", "max_prompt_tokens", "rate_limit_per_minute", "rate_limit_burst"):
        v = getattr(c, name)
        need(v is None or v >= 1, name, "must be >= 1")
    need(c.reader_lead_bytes >= 0, "reader_lead_bytes", "must be >= 0")
    for name in ("max_preauth_connections", "max_control_bytes", "max_transport_buffer", "ping_burst",
                 "stall_min_bytes_per_s", "prompt_chars_per_token", "ws_frame_burst"):
        need(getattr(c, name) >= 1, name, "must be >= 1")
    for name in ("max_connections_per_client", "max_generations_per_client", "max_raw_connections",
                 "max_connections_per_address"):
        v = getattr(c, name)
        need(v is None or v >= 1, name, "must be >= 1")
    for name in ("auth_timeout_s", "ping_rate_per_s", "header_timeout_s", "body_timeout_s", "ws_frames_per_s"):
        need(getattr(c, name) > 0, name, "must be > 0")
    for name in ("stall_timeout_s", "drain_timeout_s", "priority_aging_s"):
        need(getattr(c, name) > 0, name, "must be > 0")
    for name in ("request_timeout", "idle_timeout_s", "ping_interval_s", "ping_timeout_s"):
        v = getattr(c, name)
        need(v is None or v > 0, name, "must be > 0")
    need(c.max_batch_wait_ms >= 0, "max_batch_wait_ms", "must be >= 0")
    need(c.abuse_cooldown_s >= 0, "abuse_cooldown_s", "must be >= 0")
    need(c.kv_cache_gb is None or c.kv_cache_gb > 0, "kv_cache_gb", "must be > 0")
    need(1 <= c.block_size <= 4096, "block_size", "must be in 1..4096")
    need(c.compile in ("auto", "on", "off"), "compile", "must be auto, on or off")
    need(c.cpu_gemm in ("auto", "onednn", "default"), "cpu_gemm", "must be auto, onednn or default")
    need(c.engine_process in ("auto", "on", "off"), "engine_process", "must be auto, on or off")
    need(c.resume_window_s >= 0, "resume_window_s", "must be >= 0")
    need(c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda"), "device",
         "must be auto, cpu or cuda[:N]")
    need(c.dtype in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"), "dtype",
         "must be auto, float32, bfloat16 or float16")
    need(c.log_level.upper() in LOG_LEVELS, "log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    need(c.log_format in LOG_FORMATS, "log_format", f"must be one of {', '.join(LOG_FORMATS)}")
    need(c.quantization in QUANTIZATIONS, "quantization", f"must be one of {', '.join(QUANTIZATIONS)}")
    need(c.max_transport_buffer >= c.send_high_watermark + c.transport_high_water, "max_transport_buffer",
         "must be >= send_high_watermark + transport_high_water (one coalesced frame over the high-water mark)")
    low = c.low_watermark
    need(0 <= low < c.send_high_watermark, "send_low_watermark", "must be >= 0 and below send_high_watermark")
