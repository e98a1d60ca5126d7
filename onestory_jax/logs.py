"""Console logging for the entry points: our messages, clu's progress/metrics, and warnings from libraries."""

import logging as py_logging

from absl import logging

_KEEP = ("onestory_jax", "clu", "logging_writer.py", "local.py", "periodic_actions.py")


class _LibraryFilter(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or any(k in record.pathname for k in _KEEP)


def quiet_libraries() -> None:
  """Drops INFO chatter from orbax, grain and jax; keeps ours, clu's and every warning."""
  logging.get_absl_handler().addFilter(_LibraryFilter())
