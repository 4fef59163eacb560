"""rtws tests: ``unit/`` (no sockets, no torch where possible), ``integration/`` (real uvicorn, real models).

``tests`` is a package so that pytest's default ``prepend`` import mode puts the repository root on
``sys.path`` and test modules import shared code as ``tests.helpers.<module>`` (no ``sys.path`` hack).
"""
