"""Console logging for the entry points: our messages, clu's progress/metrics, and warnings from libraries.

:func:`muted_abandoned_io` also keeps out the noise of orbax's failed reads and writes (see there): the checkpoint
code reports each such failure itself, in one line.
"""

import contextlib
import importlib.abc
import importlib.machinery
import io
import logging as py_logging
import os
import re
import sys
import tempfile
import threading
import traceback
from typing import Any, Callable, Iterator

from absl import app
from absl import flags
from absl import logging

VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of an error, not just its one line.")

_KEEP = ("onestory_jax", "clu", "logging_writer.py", "local.py", "periodic_actions.py")


class _LibraryFilter(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno < py_logging.WARNING and "logging_writer.py" in record.pathname:
      # clu logs the whole flattened config as one "[Hyperparameters] {...}" line of thousands of characters; it is in
      # TensorBoard and in every checkpoint already.
      return not str(record.msg).startswith("[Hyperparameters]")
    return record.levelno >= py_logging.WARNING or any(k in record.pathname for k in _KEEP)


def quiet_libraries() -> None:
  """Drops INFO chatter from orbax, grain and jax; keeps ours, clu's and every warning."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryFilter) for f in handler.filters):
    handler.addFilter(_LibraryFilter())


def run(
    main: Callable[[list[str]], Any],
    bad_input: tuple[type[BaseException], ...] = (ValueError, OSError),
    positional: bool = False,
) -> None:
  """``app.run(main)`` for an entry point. Libraries are quiet (:func:`quiet_libraries`); a bad flag, an unexpected
  argument or bad input (an exception of ``bad_input`` from ``main``) ends the run with one line on stderr, naming
  the flag, file or field, and exit status 2; ``--verbose`` adds the traceback. Positional arguments are refused
  unless ``positional``."""

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
      # config_flags puts the config file's own error (with its traceback) under a "...: Error whilst parsing" line.
      line = f"{lines[0]} {lines[-1]}" if len(lines) > 1 and lines[0].endswith(":") else lines[0]
      print(f"{line} (--help lists the flags)", file=sys.stderr, flush=True)
      sys.exit(2)

  def body(argv: list[str]) -> None:
    quiet_libraries()
    try:
      if len(argv) > 1 and not positional:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (flags are written --name=value)")
      main(argv)
    except (app.UsageError, *bad_input) as e:
      exit_with(e, 2, VERBOSE.value)

  app.run(body, flags_parser=parse)


# ---------------------------------------------------------------------------------------------------------------
# TensorFlow (clu's metric writers, tensorflow-datasets) prints C++ INFO lines when it is imported, before any Python
# logging is set up ("oneDNN custom operations are on ...", "All log messages before absl::InitializeLog() ..."); its
# environment variables no longer turn them off. The import runs with file descriptor 2 captured, and everything but
# those lines is passed on.
_TF_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} [\d:.]+ +\d+ (port|cpu_feature_guard)\.cc:\d+\] .*"
    r"|To enable the following instructions: .*in other operations, rebuild TensorFlow .*)$"
)


class _QuietLoader(importlib.abc.Loader):

  def __init__(self, loader):
    self._loader = loader

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module) -> None:
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
      os.dup2(captured.fileno(), 2)
      try:
        self._loader.exec_module(module)
      finally:
        os.dup2(saved, 2)
        os.close(saved)
        captured.seek(0)
        text = captured.read().decode("utf-8", "replace")
        sys.stderr.write("".join(l for l in text.splitlines(keepends=True) if not _TF_NOISE.match(l.rstrip("\n"))))


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):

  def find_spec(self, name, path=None, target=None):
    if name != "tensorflow":
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is not None and spec.loader is not None:
      spec.loader = _QuietLoader(spec.loader)
    return spec


def quiet_tensorflow_startup() -> None:
  """Filters TensorFlow's start-up lines (see above) from the first import of ``tensorflow`` on."""
  if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlowFinder())


_ORBAX = "/orbax/checkpoint/"
_CLOSED_LOOP = "RuntimeError: Event loop is closed"
_CHAINED = ("Traceback (most recent call last):", "During handling of the above", "The above exception was")


class _OrbaxFailureFilter(py_logging.Filter):
  """Drops orbax's error logs (a background thread's failed read or write, with its traceback) and asyncio's "task
  exception was never retrieved" / "_GatheringFuture exception was never retrieved" for orbax's work: the same
  failure reaches the checkpoint code as the exception of the save or restore, which it reports in one line.

  A task's record names its coroutine's file; a gathering future's names nothing, so its exception's traceback is
  searched for orbax's frames too."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno < py_logging.ERROR:
      return True
    if _ORBAX in record.pathname:  # its threads' errors come back as the exception of the save or restore
      return False
    if record.name != "asyncio":
      return True
    tb = record.exc_info[2] if record.exc_info else None
    frames = traceback.extract_tb(tb) if tb is not None else []
    return not (_ORBAX in record.getMessage() or any(_ORBAX in f.filename for f in frames))


class _ClosedLoopFilter(io.TextIOBase):
  """``sys.stderr`` minus the tracebacks that end in "Event loop is closed".

  When an orbax read or write fails, orbax closes its event loop while tensorstore's other operations are in flight;
  each of them, as it lands, prints that traceback from its own thread. Lines are held per thread while a traceback
  is being written, and the traceback is dropped if its last line is that error.
  """

  def __init__(self, stream):
    super().__init__()
    self._stream = stream
    self._held: dict[int, list[str]] = {}
    self._partial: dict[int, str] = {}
    self._lock = threading.Lock()

  def write(self, text: str) -> int:
    me, n = threading.get_ident(), len(text)
    with self._lock:
      *lines, rest = (self._partial.pop(me, "") + text).split("\n")
      for line in lines:
        held = self._held.get(me)
        if held is None:
          if line.startswith(_CHAINED[0]):
            self._held[me] = [line]
          else:
            self._stream.write(line + "\n")
        elif not line or line[0].isspace() or line.startswith(_CHAINED):
          held.append(line)
        else:  # the exception's own line ends the traceback
          del self._held[me]
          if line.strip() != _CLOSED_LOOP:
            self._stream.write("\n".join(held + [line]) + "\n")
      if me in self._held or (rest and _CHAINED[0].startswith(rest)):
        self._partial[me] = rest  # inside a traceback, or perhaps its first line: wait for the rest of the line
      elif rest:
        self._stream.write(rest)  # an unfinished line (a progress bar's "\r..."): through at once
    return n

  def flush(self) -> None:
    self._stream.flush()

  def isatty(self) -> bool:
    return self._stream.isatty()

  @property
  def encoding(self) -> str:
    return getattr(self._stream, "encoding", "utf-8")

  def fileno(self) -> int:
    return self._stream.fileno()


def _drop_orbax_unraisable(default):
  def hook(unraisable) -> None:
    code = getattr(unraisable.object, "cr_code", None)
    if code is None or _ORBAX not in code.co_filename:
      default(unraisable)

  return hook


def _mute() -> Callable[[], None]:
  """Installs the filters of :func:`muted_abandoned_io`; returns what takes them away again (a no-op if they were
  already installed)."""
  if isinstance(sys.stderr, _ClosedLoopFilter):
    return lambda: None
  stderr, hook, log_filter = sys.stderr, sys.unraisablehook, _OrbaxFailureFilter()
  handlers = [logging.get_absl_handler(), py_logging.getLogger("asyncio")]
  sys.stderr, sys.unraisablehook = _ClosedLoopFilter(stderr), _drop_orbax_unraisable(hook)
  for h in handlers:
    h.addFilter(log_filter)

  def restore() -> None:
    sys.stderr.flush()
    sys.stderr, sys.unraisablehook = stderr, hook
    for h in handlers:
      h.removeFilter(log_filter)

  return restore


@contextlib.contextmanager
def muted_abandoned_io() -> Iterator[None]:
  """Keeps out, while active, the noise of orbax reads and writes that failed: its error logs, asyncio's
  unretrieved task exceptions, "Event loop is closed" tracebacks and unraisable orbax coroutines. Everything else
  passes. Nested use is fine."""
  restore = _mute()
  try:
    yield
  finally:
    restore()


def mute_abandoned_io() -> None:
  """:func:`muted_abandoned_io` for the rest of the process (entry points: the operations that a failed save leaves
  in flight may land as late as the interpreter's exit)."""
  _mute()


def exit_with(error: BaseException, status: int, verbose: bool = False) -> None:
  """Ends an entry point: ``error`` as one line on stderr (after its traceback with ``--verbose``), then ``status``."""
  if verbose:
    traceback.print_exception(error)
  first = str(error).strip().splitlines()
  print(first[0] if first else type(error).__name__, file=sys.stderr, flush=True)
  sys.exit(status)


class _NoBar:
  """What :func:`progress` returns when it is off."""

  def update(self, n: int = 1) -> None:
    pass

  def close(self) -> None:
    pass


def progress(total: int, desc: str, on: bool = True, unit: str = "it", leave: bool = True):
  """A tqdm progress bar with ETA on stderr when ``on`` (the command lines); a silent stand-in otherwise (the
  Python API is quiet by default)."""
  if not on or total == 0:
    return _NoBar()
  import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm.tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
