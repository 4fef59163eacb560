"""Thread defaults and elastic threads (rtws.threads): pure logic with injected clocks and counters."""

from __future__ import annotations

from pathlib import Path

from rtws.threads import SPARE_DOWN, SPARE_UP, ElasticThreads, SpareCore, choose_threads, read_proc_stat


def test_elastic_top_only_where_rtws_chose() -> None:
    assert choose_threads(2, "cpu").elastic_top == 2  # 1 for the forward; the loop's core may be borrowed
    assert choose_threads(16, "cpu").elastic_top == 16
    assert "up to 2" in choose_threads(2, "cpu").reason
    assert choose_threads(2, "cpu", elastic=False).elastic_top is None
    assert choose_threads(2, "cpu", torch_threads=1).elastic_top is None  # configured: fixed
    assert choose_threads(1, "cpu").elastic_top is None  # one core: nothing to borrow
    assert choose_threads(16, "cuda").elastic_top is None


class Machine:
    """A fake /proc/stat busy counter, this process's CPU time and a clock, advanced by hand."""

    def __init__(self) -> None:
        self.t = self.busy = self.own = 0.0

    def run(self, seconds: float, others: float, own: float) -> None:
        """``seconds`` pass with ``others`` cores used elsewhere and ``own`` cores by this process."""
        self.t += seconds
        self.busy += seconds * (others + own)
        self.own += seconds * own

    def spare_core(self, cores: int = 2) -> SpareCore:
        return SpareCore(cores, 0.2, busy=lambda: self.busy, own=lambda: self.own, clock=lambda: self.t)


def test_spare_core_hysteresis_and_own_time_excluded() -> None:
    m = Machine()
    sc = m.spare_core()
    assert not sc.poll()  # no window has passed: not spare until measured
    m.run(0.25, others=0.1, own=2.0)  # this process using both cores does not count against it
    assert sc.poll() and abs(sc.others - 0.1) < 1e-9
    m.run(0.05, others=1.0, own=1.0)
    assert sc.poll()  # inside the window: the last answer stands
    m.run(0.2, others=(SPARE_UP + SPARE_DOWN) / 2, own=1.0)  # between the thresholds: stays spare
    assert sc.poll()
    m.run(0.25, others=SPARE_DOWN + 0.2, own=1.0)
    assert not sc.poll()
    m.run(0.25, others=(SPARE_UP + SPARE_DOWN) / 2, own=1.0)  # between them again: stays not spare
    assert not sc.poll()
    m.run(0.25, others=SPARE_UP - 0.1, own=1.0)
    assert sc.poll()


def test_spare_core_never_on_one_core_or_without_proc_stat() -> None:
    m = Machine()
    one = m.spare_core(cores=1)
    m.run(0.3, others=0.0, own=1.0)
    assert not one.poll()
    blind = SpareCore(2, 0.2, busy=lambda: None)
    assert not blind.poll()


def test_elastic_threads_follow_the_spare_core() -> None:
    m = Machine()
    calls: list[int] = []
    el = ElasticThreads(1, 2, m.spare_core(), set_threads=calls.append)
    assert el.for_step(32) == 1 and calls == []  # not measured yet
    m.run(0.3, others=0.1, own=1.0)
    assert el.for_step(32) == 2 and calls == [2]
    assert el.for_step(32) == 2 and calls == [2]  # set only when it changes
    assert el.for_step(4, compiled=True) == 1 and calls == [2, 1]  # compiled kernels were built for base
    assert el.for_step(0) == 1  # nothing to run
    assert el.for_step(1) == 2
    m.run(0.3, others=1.5, own=1.0)  # the event loop (or anything else) needs its core back
    assert el.for_step(32) == 1 and calls == [2, 1, 2, 1]
    assert el.steps_at_top == 3


def test_elastic_threads_keep_small_steps_at_base() -> None:
    """Below ``min_rows`` (measured by the runner; at least 4) a step stays at base even with a core spare."""
    m = Machine()
    calls: list[int] = []
    el = ElasticThreads(1, 2, m.spare_core(), set_threads=calls.append, min_rows=4)
    m.run(0.3, others=0.1, own=1.0)
    assert el.for_step(1) == 1 and el.for_step(3) == 1 and calls == []
    assert el.for_step(4) == 2 and el.for_step(1) == 1 and calls == [2, 1]


def test_read_proc_stat(tmp_path: Path) -> None:
    f = tmp_path / "stat"
    f.write_text("cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    import os

    hz = os.sysconf("SC_CLK_TCK")
    assert read_proc_stat(str(f)) == (100 + 5 + 50 + 3 + 2 + 1) / hz  # idle and iowait left out
    assert read_proc_stat(str(tmp_path / "missing")) is None
    f.write_text("intr 1 2 3\n")
    assert read_proc_stat(str(f)) is None
    if Path("/proc/stat").exists():
        assert (v := read_proc_stat()) is not None and v > 0
