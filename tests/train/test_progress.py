"""The progress line of a run: a few lines in a log, one line rewritten on a terminal."""

import io

from micle_jax.train import progress


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_a_log_gets_a_line_per_quarter_with_rate_and_time_left():
  stream, clock = io.StringIO(), _Clock()
  shown = progress.Progress("pretrain micle", 0, 100, stream=stream, clock=clock)
  for step in range(1, 101):
    clock.now = step * 0.5  # 2 steps/s
    shown.update(step)
  lines = stream.getvalue().splitlines()
  assert len(lines) == 4
  assert lines[0] == "[pretrain micle] step 25/100 (25%), 2.00 steps/s, 12s elapsed, ETA 38s"
  assert lines[-1] == "[pretrain micle] step 100/100 (100%), 2.00 steps/s, 50s elapsed, done"


def test_a_terminal_line_is_rewritten_in_place_and_a_resumed_run_counts_from_its_start():
  class Terminal(io.StringIO):
    def isatty(self):
      return True

  stream, clock = Terminal(), _Clock()
  shown = progress.Progress("fine-tune", 40, 50, stream=stream, clock=clock)
  for step in range(41, 51):
    clock.now += 60.0
    shown.update(step)
  text = stream.getvalue()
  assert text.count("\r") == 10 and text.endswith("done\n") and text.count("\n") == 1
  assert "step 41/50 (82%), 0.02 steps/s, 1m00s elapsed, ETA 9m00s" in text


def test_off_process_zero_or_with_nothing_to_do_it_writes_nothing():
  stream = io.StringIO()
  progress.Progress("x", 0, 10, stream=stream, enabled=False).update(5)
  progress.Progress("x", 10, 10, stream=stream).update(10)
  assert stream.getvalue() == ""
