"""Progress of long inference work: cases, and the windows within a large case, with the time left.

    progress = Progress("evaluate step 1000", num_cases)
    for case in cases:
        progress.start_case(case_id)
        ...  predictor.labels(image, progress=progress.windows)   # (done, total) windows of this case
        progress.end_case()

On a terminal (the stream is a tty) one line is redrawn as a bar; otherwise (nohup, a log file, a
pipe) plain lines are printed, at most one per `interval_s` within a case, plus one per finished
case. The time left is the elapsed time per unit of work so far times the units still to do: per
window within a case, per case for the whole run.
"""
import sys
import time
from typing import Optional, TextIO

BAR_WIDTH = 24


def format_seconds(seconds: float) -> str:
    """'42 s', '3 min 5 s' or '2 h 04 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Reports `num_cases` cases of the work `what` to `stream` (stdout by default)."""

    def __init__(self, what: str, num_cases: Optional[int], stream: Optional[TextIO] = None,
                 interval_s: float = 30.0):
        self.what, self.num_cases = what, num_cases
        self.stream = stream or sys.stdout
        self.interval_s = interval_s
        self.is_terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self.cases_done = 0
        self.case_name, self.case_started, self.last_line = "", 0.0, 0.0

    def start_case(self, name: str) -> None:
        """A case begins (its windows are reported by `windows`)."""
        self.case_name, self.case_started = name, time.monotonic()
        self.last_line = self.case_started

    def windows(self, done: int, total: int) -> None:
        """`done` of the case's `total` windows are recombined (a callable for `Predictor`'s progress)."""
        now = time.monotonic()
        if not self.is_terminal and (done >= total or now - self.last_line < self.interval_s):
            return  # in a log: a line per interval within a case; `end_case` reports its end
        elapsed = now - self.case_started
        left = elapsed / done * (total - done) if done else float("nan")
        text = f"{self._case_label()}: windows {done}/{total}"
        if done and done < total:
            text += f", {format_seconds(left)} left in this case"
        self._emit(text, bar=done / max(total, 1), final=False)
        self.last_line = now

    def end_case(self) -> None:
        """The case is done (segmented, and scored or written)."""
        self.cases_done += 1
        now = time.monotonic()
        text = f"{self._case_label(finished=True)} done in {format_seconds(now - self.case_started)}"
        if self.num_cases and self.cases_done < self.num_cases:
            per_case = (now - self.started) / self.cases_done
            text += f"; {format_seconds(per_case * (self.num_cases - self.cases_done))} left"
        self._emit(text, bar=None, final=True)

    def _case_label(self, finished: bool = False) -> str:
        number = self.cases_done + (0 if finished else 1)
        of = f"/{self.num_cases}" if self.num_cases else ""
        return f"{self.what}: case {number}{of} {self.case_name}"

    def _emit(self, text, bar, final):
        if not self.is_terminal:
            print(text, file=self.stream, flush=True)
            return
        if bar is not None:
            filled = int(round(bar * BAR_WIDTH))
            text = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {text}"
        self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        self.stream.flush()
