"""Records that cannot be read: marked where they fail, skipped and counted later.

Training must not stop at one bad record among millions. Reading and
decoding run in grain's worker processes, where a count would be lost, so
a failure becomes an *error record* (a dict with ``ERROR_KEY``) that
travels to the main process; ``InputIterator`` counts, logs and drops it --
and stops with ``TooManySkipsError`` when most records fail, instead of
skipping forever. An image without a caption is marked with
``MISSING_CAPTION_KEY`` (its path), whichever ``data.missing_caption``
policy then applies, so that it is counted too.
"""

from __future__ import annotations

ERROR_KEY = "_error"
MISSING_CAPTION_KEY = "_missing_caption"


class TooManySkipsError(RuntimeError):
  """Most records read lately could not be used: the data, not a few files, is broken."""


def error_record(message: str) -> dict:
  return {ERROR_KEY: message}


class SafeRead:
  """Wraps a random-access source: a read that raises yields an error record."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    try:
      return self.source[index]
    except Exception as error:  # Any reader failure: skip the record, never crash.
      return error_record(f"record {index} of {self.source!r}: {type(error).__name__}: {error}")

  def __repr__(self) -> str:
    return f"SafeRead({self.source!r})"
