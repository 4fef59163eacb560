"""rtws's HTTP side, one noun per module, no framework.

- :mod:`~rtws.http.asgi`: ASGI types and helpers (headers, bounded body reads, JSON and error responses).
- :mod:`~rtws.http.errors`: :class:`~rtws.http.errors.Rejection`, an HTTP request refused before an engine.
"""
