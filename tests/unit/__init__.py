"""Unit tier: pure modules and the Session against a fake engine; no sockets, no server, no model."""
