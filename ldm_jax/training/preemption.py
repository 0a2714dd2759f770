"""The exit status of a preempted run, and SIGTERM handling outside the loop.

Imports nothing heavy, so entry points install the handler before JAX loads.
"""

import logging
import signal

# A run stopped by SIGTERM (checkpoint saved; the same command resumes it)
# exits with this status, a finished one with 0, a failed one with 1. It is
# what a shell reports for a process killed by SIGTERM, so a scheduler that
# retries preempted jobs treats both alike.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


def exit_on_sigterm() -> None:
  """Until the training loop takes SIGTERM over (and after it gives it back),
  SIGTERM exits at once with ``PREEMPTED_EXIT_CODE``: start-up (loading,
  compiling) has nothing to save."""

  def on_term(signum, frame):
    logging.warning("SIGTERM outside the training loop: exiting with status %d (the same command resumes "
                    "from the last checkpoint, if any)", PREEMPTED_EXIT_CODE)
    raise SystemExit(PREEMPTED_EXIT_CODE)

  signal.signal(signal.SIGTERM, on_term)
