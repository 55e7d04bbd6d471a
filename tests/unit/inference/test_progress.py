"""Progress of long inference work (medseg_dl.inference.progress): plain lines in a log, a redrawn bar on a
terminal, and the time left from the work done so far."""
import io

import pytest

from medseg_dl.inference import progress as progress_module
from medseg_dl.inference.progress import Progress, format_seconds


class Clock:
    """A stand-in for time.monotonic that the test advances."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    return clock


def test_a_log_gets_a_line_per_interval_within_a_case_and_one_per_case_with_the_time_left(clock):
    log = io.StringIO()
    progress = Progress("step 100", 4, stream=log, interval_s=30)
    progress.start_case("a")
    clock.now += 10
    progress.windows(1, 4)  # 10 s after the start: within the interval, no line
    clock.now += 30
    progress.windows(2, 4)  # 40 s: a line, 2 of 4 windows in 40 s -> 40 s left in the case
    clock.now += 40
    progress.windows(4, 4)  # the case's end is reported by end_case
    progress.end_case()     # 80 s per case, 3 cases to go
    assert log.getvalue().splitlines() == ["step 100: case 1/4 a: windows 2/4, 40 s left in this case",
                                           "step 100: case 1/4 a done in 1 min 20 s; 4 min 0 s left"]


def test_a_terminal_gets_one_redrawn_bar(clock):
    screen = Terminal()
    progress = Progress("predict", 2, stream=screen)
    progress.start_case("ct_1")
    clock.now += 5
    progress.windows(1, 2)
    progress.windows(2, 2)
    progress.end_case()
    text = screen.getvalue()
    assert text.count("\r\033[K") == 3 and text.endswith("predict: case 1/2 ct_1 done in 5 s; 5 s left\n")
    assert "[############............] predict: case 1/2 ct_1: windows 1/2, 5 s left in this case" in text


@pytest.mark.parametrize("seconds, text", [(42.4, "42 s"), (185, "3 min 5 s"), (7440, "2 h 04 min")])
def test_seconds_are_written_for_people(seconds, text):
    assert format_seconds(seconds) == text
