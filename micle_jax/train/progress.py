"""One progress line per run: steps done, rate and time left.

On a terminal the line is rewritten in place; in a log (stderr not a terminal) a line is written
at each quarter of the run and at its end, so a CI log holds a handful, not one per step.
"""

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


class Progress:
  """`update(step)` after each step of a run from `start` to `end` (process 0 only writes)."""

  def __init__(
    self,
    label: str,
    start: int,
    end: int,
    *,
    stream: TextIO | None = None,
    enabled: bool = True,
    clock=time.perf_counter,
  ):
    self.label, self.start, self.end = label, start, end
    self.stream = stream if stream is not None else sys.stderr
    self.enabled = enabled and end > start
    self.live = self.enabled and getattr(self.stream, "isatty", lambda: False)()
    self.clock = clock
    self.began = clock()
    self.next_quarter = 1

  def line(self, step: int) -> str:
    done = step - self.start
    elapsed = self.clock() - self.began
    rate = done / elapsed if elapsed > 0 else 0.0
    left = (self.end - step) / rate if rate > 0 else 0.0
    eta = "done" if step >= self.end else f"ETA {_duration(left)}"
    return (
      f"[{self.label}] step {step}/{self.end} ({100 * step / self.end:.0f}%), "
      f"{rate:.2f} steps/s, {_duration(elapsed)} elapsed, {eta}"
    )

  def update(self, step: int) -> None:
    if not self.enabled:
      return
    if self.live:
      end = "\n" if step >= self.end else ""
      self.stream.write("\r\033[K" + self.line(step) + end)
      self.stream.flush()
      return
    quarter = (step - self.start) * 4 // (self.end - self.start)
    if quarter >= self.next_quarter or step >= self.end:
      self.next_quarter = quarter + 1
      self.stream.write(self.line(step) + "\n")
      self.stream.flush()
