"""The route table of rtws's generation APIs over HTTP: ``/infer``, the OpenAI ``/v1/*`` routes and ``/health``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .infer import InferRoute
from .openai import OpenAIRoutes
from .stream import HttpStreams

if TYPE_CHECKING:
    from ..app import App


def mount(app: App) -> HttpStreams:
    """Register the routes on ``app`` and their :class:`~rtws.http.stream.HttpStreams` as a stream owner (so
    ``app.num_http_streams`` counts them, and HTTP generations still running when a drain times out end with
    reason ``cancelled``; their responses complete normally). Pass it in ``App(routes=[...])``."""
    streams = HttpStreams(app)
    infer, openai = InferRoute(streams), OpenAIRoutes(streams)
    app.route("POST", "/infer", infer.infer)
    app.route("POST", "/v1/completions", openai.completions)
    app.route("POST", "/v1/chat/completions", openai.chat_completions)
    app.route("GET", "/v1/models", openai.list_models)
    app.route_prefix("GET", "/v1/models/", openai.get_model)
    app.route("GET", "/health", openai.health)
    app.add_stream_owner(streams)
    return streams
