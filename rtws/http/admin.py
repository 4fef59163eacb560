"""Admin HTTP API: add, hot-swap and remove models at runtime, and read their status.

Every ``/admin/`` request needs ``Authorization: Bearer <key>`` with one of
``config.admin_api_keys`` (or, when none are set, ``config.api_keys``). With no
key configured at all the admin API is refused (403): it is never open.

Routes (JSON bodies and answers; errors are ``{"error": {"code", "message"}}``):

- ``GET /admin/models``: ``{"default", "models": registry.health()}``.
- ``POST /admin/models`` ``{"name", "model_path", "version"="1", "device"?, "dtype"?, "quantization"?,
  "default"=false}``: add a model under a new name. 202 with the version's status and ``status_url``;
  422 ``load_failed`` with the one-line reason (as ``rtws serve`` prints it) when the model cannot load
  (no such folder, no weights, corrupt safetensors, unknown architecture, remote code, no CUDA, ...).
  A failure found only while loading shows as the version's ``failed`` status with the same line as ``reason``.
- ``GET /admin/models/{name}``: that model's health entry.
- ``POST /admin/models/{name}/versions`` ``{"version", "model_path", "device"?, "dtype"?, "quantization"?}``: hot-swap.
  202 with ``status_url``; the old version serves until the new one is warm.
- ``GET /admin/models/{name}/versions/{version}``: ``loading``, ``warm``, ``failed`` (with ``reason``),
  ``draining`` or ``unloaded``.
- ``DELETE /admin/models/{name}``: stop routing to the model; in-flight generations finish, then it unloads.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ..auth import key_ok
from ..errors import RtwsError
from ..model import ModelSpec
from .asgi import BodyTooLarge, Receive, Scope, Send, bearer_token, read_body, send_error, send_json

if TYPE_CHECKING:
    from ..app import App

Reply = tuple[int, Any, list[tuple[bytes, bytes]]]  # status, JSON body, extra headers
Route = Callable[["re.Match[str]", Receive], Awaitable[Reply]]

PREFIX = "/admin/"
MAX_BODY = 64 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
_MODELS_PATH = re.compile(r"^/admin/models/?$")
_VERSION_PATH = re.compile(r"^/admin/models/(?P<name>.+)/versions/(?P<version>[^/]+)$")
_VERSIONS_PATH = re.compile(r"^/admin/models/(?P<name>.+)/versions$")
_MODEL_PATH = re.compile(r"^/admin/models/(?P<name>.+)$")


class VersionRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of ``POST /admin/models/{name}/versions``."""

    version: str
    model_path: str
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    default: bool = False


class ModelRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of ``POST /admin/models``."""

    name: str
    model_path: str
    version: str = "1"
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    default: bool = False


def admin_keys(app: App) -> frozenset[str]:
    """The keys that open the admin API: ``admin_api_keys``, else ``api_keys``."""
    cfg = app.config
    return frozenset(cfg.admin_api_keys or cfg.api_keys)


def mount_admin(app: App) -> None:
    """Add the ``/admin/`` routes and the registry's shutdown hook to ``app``."""
    api = AdminAPI(app)
    for method in ("GET", "POST", "DELETE"):
        app.route_prefix(method, PREFIX, api.handle)
    app.on_shutdown.append(app.registry.aclose)


class AdminAPI:
    """The ``/admin/`` routes of one app: a route table of (path pattern, {method: handler}), tried in order;
    a path that matches with another method is 405, no match is 404."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.routes: list[tuple[re.Pattern[str], dict[str, Route]]] = [
            (_MODELS_PATH, {"GET": self._list, "POST": self._add}),
            (_VERSION_PATH, {"GET": self._version}),
            (_VERSIONS_PATH, {"POST": self._swap}),
            (_MODEL_PATH, {"GET": self._model, "DELETE": self._remove}),
        ]

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = admin_keys(self.app)
        if not keys:
            await send_error(send, "forbidden", "the admin API is disabled: configure admin_api_keys", status=403)
            return
        token = bearer_token(scope)
        if not token or not key_ok(token, keys):
            self.app.hooks.rejected("admin_unauthorized")
            await send_error(send, "unauthorized", "missing or invalid admin API key",
                             headers=[(b"www-authenticate", b'Bearer realm="rtws-admin"')])
            return
        try:
            status, body, headers = await self._dispatch(scope["method"], scope["path"], receive)
        except RtwsError as exc:  # refusals of this API and of the registry: status from the one code table
            await send_error(send, exc.code, exc.message, status=exc.http_status)
            return
        except ConnectionResetError:
            return
        await send_json(send, status, body, headers)

    async def _dispatch(self, method: str, path: str, receive: Receive) -> Reply:
        for pattern, handlers in self.routes:
            m = pattern.match(path)
            if m is None:
                continue
            handler = handlers.get(method)
            if handler is None:
                raise RtwsError("method_not_allowed", f"{method} {path} is not allowed")
            return await handler(m, receive)
        raise RtwsError("not_found", f"no route for {path}")

    # ------------------------------------------------------------------ the routes

    async def _list(self, m: re.Match[str], receive: Receive) -> Reply:
        reg = self.app.registry
        return 200, _one_line_reasons({"default": reg.default_name, "models": reg.health()}), []

    async def _add(self, m: re.Match[str], receive: Receive) -> Reply:
        req = await _body(receive, ModelRequest)
        _check_name(req.name, "name")
        if self.app.registry.known(req.name):
            raise RtwsError("conflict", f"model {req.name!r} exists; POST a version to "
                            f"/admin/models/{req.name}/versions to swap it")
        return await self._start(req.name, req.version, req.model_path, req.device, req.dtype, req.default,
                                 req.quantization)

    async def _version(self, m: re.Match[str], receive: Receive) -> Reply:
        st = self.app.registry.status(m["name"], m["version"])
        if st is None:
            raise RtwsError("not_found", f"model {m['name']!r} has no version {m['version']!r}")
        return 200, _one_line_reasons({"model": st.name, **st.as_dict()}), []

    async def _swap(self, m: re.Match[str], receive: Receive) -> Reply:
        name = m["name"]
        if not self.app.registry.known(name):
            raise RtwsError("unknown_model", f"unknown model {name!r}; POST /admin/models to add it")
        vreq = await _body(receive, VersionRequest)
        return await self._start(name, vreq.version, vreq.model_path, vreq.device, vreq.dtype, vreq.default,
                                 vreq.quantization)

    async def _model(self, m: re.Match[str], receive: Receive) -> Reply:
        name = m["name"]
        for item in self.app.registry.health():
            if item["name"] == name:
                return 200, _one_line_reasons(item), []
        raise RtwsError("unknown_model", f"unknown model {name!r}")

    async def _remove(self, m: re.Match[str], receive: Receive) -> Reply:
        name = m["name"]
        reg = self.app.registry
        if not reg.known(name):
            raise RtwsError("unknown_model", f"unknown model {name!r}")
        st = reg.retire(name)
        if st is None:
            return 200, {"model": name, "status": "removed"}, []
        return 202, self._accepted(st.name, st.version, st.state), []

    async def _start(self, name: str, version: str, path: str, device: str | None, dtype: str | None,
                     default: bool, quantization: str | None = None) -> Reply:
        import dataclasses


        _check_name(version, "version")
        if not path.strip() or len(path) > 4096:
            raise RtwsError("invalid_params", "model_path must be a non-empty path or hub id")
        changes = {k: v for k, v in (("device", device), ("dtype", dtype), ("quantization", quantization))
                   if v is not None}
        try:
            self.app.config.replace(**changes)
        except ValueError as exc:
            raise RtwsError("invalid_params", str(exc)) from None
        spec = ModelSpec.from_config(self.app.config, name=name, path=path, version=version, device=device,
                                     dtype=dtype)
        if quantization is not None:
            spec = dataclasses.replace(spec, quantization=quantization)
        st = self.app.registry.start_swap(spec, self.app.load_model, default=default)
        body = self._accepted(name, version, st.state)
        return 202, body, [(b"location", body["status_url"].encode())]

    @staticmethod
    def _accepted(name: str, version: str, state: str) -> dict[str, Any]:
        return {"model": name, "version": version, "status": state,
                "status_url": f"/admin/models/{name}/versions/{version}"}


_LOAD_ERROR_PREFIX = "ModelLoadError: "


def _one_line_reasons(obj: Any) -> Any:
    """Failure reasons as ``rtws serve`` prints them: the registry's ``ModelLoadError: `` type prefix dropped."""
    if isinstance(obj, dict):
        out = {k: _one_line_reasons(v) for k, v in obj.items()}
        reason = out.get("reason")
        if isinstance(reason, str) and reason.startswith(_LOAD_ERROR_PREFIX):
            out["reason"] = reason[len(_LOAD_ERROR_PREFIX):]
        return out
    if isinstance(obj, list):
        return [_one_line_reasons(v) for v in obj]
    return obj


def _check_name(value: str, field: str) -> None:
    if not _NAME.fullmatch(value):
        raise RtwsError("invalid_params", f"{field} must be 1-128 characters of letters, digits and ._:@+- "
                       "starting with a letter or digit")


async def _body(receive: Receive, kind: type[Any]) -> Any:
    try:
        raw = await read_body(receive, MAX_BODY)
    except BodyTooLarge:
        raise RtwsError("payload_too_large", f"body over {MAX_BODY} bytes") from None
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise RtwsError("invalid_params", str(exc)) from None
    except msgspec.DecodeError:
        raise RtwsError("invalid_params", "body must be a JSON object") from None
