"""Code the tests share (imported as ``tests.helpers.<module>``); fixtures stay in ``tests/conftest.py``."""
