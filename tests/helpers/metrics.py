"""Scraping a test server's Prometheus endpoint into comparable samples."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from tests.helpers.server import UNIT, RunningServer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(srv: RunningServer) -> Samples:
    with urllib.request.urlopen(srv.http + "/metrics", timeout=30 * UNIT) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/plain")
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name.startswith("rtws_"), fam.name
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, key  # no duplicate series
            out[key] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)
