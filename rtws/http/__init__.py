"""rtws's HTTP side, one noun per module, no framework.

- :mod:`~rtws.http.asgi`: ASGI types and helpers (headers, bounded body reads, JSON and error responses).
- :mod:`~rtws.http.errors`: :class:`~rtws.http.errors.Rejection` (a request refused before an engine) and
  :class:`~rtws.http.errors.ClientGone`.
- :mod:`~rtws.http.schemas`: the request and response bodies (msgspec Structs reusing the protocol's bounds).
- :mod:`~rtws.http.stream`: :class:`~rtws.http.stream.HttpGeneration` and
  :class:`~rtws.http.stream.HttpStreams` (reading, admission through :mod:`rtws.admission`, the one SSE loop).
- :mod:`~rtws.http.infer`: ``POST /infer``.
- :mod:`~rtws.http.openai`: the OpenAI-compatible ``/v1/*`` routes and ``GET /health``.
- :mod:`~rtws.http.admin`: the ``/admin/`` model API, dispatched through a route table.
- :mod:`~rtws.http.routes`: :func:`~rtws.http.routes.mount`, the route table of the generation APIs.
"""
