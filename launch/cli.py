r"""Launches OneStory training on Cloud TPU VMs (gcloud) or on GPU nodes (ssh).

  python launch/cli.py tpu {create,status,setup,train,logs,kill,stop,delete} [flags] [--dry-run]
  python launch/cli.py gpu {setup,train,logs,kill} [flags] [--dry-run]

Every shell command goes through one `Runner`. With ``--dry-run`` it prints each command (``shlex.join`` of its argv,
one per line) and runs nothing; otherwise it runs the argv with `subprocess` (never ``shell=True``). Commands that run
on a remote host (``gcloud ... ssh --command=...`` or ``ssh HOST CMD``) are a single string built with ``shlex.join``
from an argv list: user values (names, paths, config overrides) are separate, quoted arguments, and the only shell
code is the fixed scripts below, which read those values as positional parameters. A hostile value therefore stays
data on both the local and the remote side.

The trainer is ``python -m onestory_jax.train --config=configs/onestory.py:VARIANT --workdir=...``
(onestory_jax/train.py), which calls ``jax.distributed.initialize()`` when it runs on several hosts; for GPU nodes
this launcher exports JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID per node. See launch/README.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import os
import re
import shlex
import subprocess
import sys
import threading
from typing import TextIO

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `python launch/cli.py` from a checkout: the chip table is onestory_jax/chips.py
  sys.path.insert(0, REPO_ROOT)
from onestory_jax import chips  # pylint: disable=g-import-not-at-top,wrong-import-position  # standard library only

DEFAULT_VARIANT = "wan21_i2v_14b_480p"
LOG_FILE = "logs/train.log"  # per worker, relative to --repo-dir on that worker
LOCAL_TARBALL = "/tmp/onestory_jax_src.tgz"
REMOTE_TARBALL = "onestory_jax_src.tgz"  # relative to the remote home directory
VENV_PYTHON = ".venv/bin/python"  # created by `setup` inside --repo-dir

_POD_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)  # valid chip counts for v5litepod / v6e

# Fixed remote scripts, one line each (``bash -c SCRIPT NAME ARGS...``): user values arrive only as "$1", "$2", ...
SETUP_SCRIPT = "; ".join(
    (
        "set -eu",
        "repo=$1 extra=$2 src=$3 ref=$4 py=$5",
        'if [ -f "$src" ]; then mkdir -p -- "$repo" && tar -xzf "$src" -C "$repo"',
        'else [ -d "$repo/.git" ] || git clone -q -- "$src" "$repo"',
        'git -C "$repo" fetch -q origin "$ref" && git -C "$repo" checkout -q --detach FETCH_HEAD; fi',
        'cd -- "$repo"',
        "python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv",
        'python3 -m uv venv -q --allow-existing --seed --python "$py" .venv',
        '.venv/bin/python -m pip install -q -e ".[$extra]"',
        '.venv/bin/python -c "import jax, onestory_jax; print(jax.__version__)"',
    )
)
# Detached start: a new session (setsid -f), immune to hangups, stdout/stderr appended to the per-worker log file.
DETACH_SCRIPT = (
    'cd -- "$1" && mkdir -p -- "$(dirname -- "$2")" && log=$2 && shift 2 && ' 'exec "$@" >>"$log" 2>&1 </dev/null'
)
# "[o]nestory" keeps pgrep from matching this script's own command line.
_TRAINER_PIDS = 'pgrep -f "[o]nestory_jax[.]train"'
_KILL = 'if [ -n "$pids" ]; then echo "$(hostname): killing $pids"; {sudo}kill -9 $pids || true; fi'
KILL_TPU_SCRIPT = "; ".join(
    (
        "pids=$( { sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null; "
        + _TRAINER_PIDS
        + '; } | sort -u | tr "\\n" " ")',
        _KILL.format(sudo="sudo "),
        "sudo rm -f /tmp/libtpu_lockfile",
    )
)
KILL_GPU_SCRIPT = "; ".join(("pids=$(" + _TRAINER_PIDS + ' | tr "\\n" " ")', _KILL.format(sudo="")))


class Runner:
  """The one place that runs commands. ``dry_run`` prints ``shlex.join(argv)`` per command and runs nothing."""

  def __init__(self, dry_run: bool, out: TextIO | None = None):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self.commands: list[list[str]] = []

  def _record(self, argv: Sequence[str]) -> None:
    argv = [str(a) for a in argv]
    self.commands.append(argv)
    if self.dry_run:
      print(shlex.join(argv), file=self.out, flush=True)
    else:
      print("+", shlex.join(argv), file=sys.stderr, flush=True)

  def run(self, argv: Sequence[str]) -> None:
    """Runs one command to completion; a non-zero exit raises CalledProcessError."""
    self._record(argv)
    if not self.dry_run:
      subprocess.run(list(argv), check=True)

  def stream(self, jobs: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Runs (prefix, argv) jobs concurrently, writing each output line of a job after its prefix."""
    for _, argv in jobs:
      self._record(argv)
    if self.dry_run:
      return
    lock = threading.Lock()
    procs = [
        subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _, argv in jobs
    ]

    def pump(prefix: str, proc: subprocess.Popen) -> None:
      for line in proc.stdout:
        with lock:
          self.out.write(prefix + line)
          self.out.flush()

    threads = [threading.Thread(target=pump, args=(p, proc), daemon=True) for (p, _), proc in zip(jobs, procs)]
    for t in threads:
      t.start()
    try:
      for t in threads:
        t.join()
      codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:
      for proc in procs:
        proc.terminate()
      raise
    for (_, argv), code in zip(jobs, codes):
      if code:
        raise subprocess.CalledProcessError(code, list(argv))


# ---------------------------------------------------------------------------------------------------- validation


def _positional(flag: str, value: str) -> str:
  """A value that lands in a positional slot (a name, a host): non-empty and not readable as an option."""
  if not value or value.startswith("-"):
    raise ValueError(f"{flag} must be non-empty and must not start with '-', got {value!r}")
  return value


def _gcs_path(flag: str, value: str) -> str:
  if not re.match(r"gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/|$)", value):
    raise ValueError(f"{flag} must be a GCS path gs://BUCKET[/PATH] (every TPU worker writes there), got {value!r}")
  return value


def _key_values(flag: str, items: Sequence[str] | None, key_re: str, example: str) -> list[tuple[str, str]]:
  pairs = []
  for item in items or ():
    key, sep, value = item.partition("=")
    if not sep or not re.fullmatch(key_re, key):
      raise ValueError(f"{flag} expects KEY=VALUE with KEY like {example}, got {item!r}")
    pairs.append((key, value))
  return pairs


def tpu_hosts(accelerator_type: str) -> int:
  """Number of TPU VM workers of a slice, e.g. v5p-128 -> 16, v6e-64 -> 16; raises ValueError if unknown."""
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", accelerator_type)
  chip = m and chips.of_accelerator_prefix(m.group(1))
  if not chip:
    raise ValueError(
        f"--accelerator-type: unknown accelerator type {accelerator_type!r}; expected FAMILY-SIZE with "
        f"FAMILY in {sorted(c.accelerator_prefix for c in chips.TPUS)} (e.g. v5p-128, v6e-64)"
    )
  size, cores_per_chip, single_host_chips = int(m.group(2)), chip.cores_per_chip, chip.single_host_chips
  if cores_per_chip == 2 and (size < 8 or size % 8):
    raise ValueError(
        f"--accelerator-type: {accelerator_type!r}: {m.group(1)} sizes count TensorCores and are "
        "multiples of 8 (v5p-8 = 4 chips = 1 host)"
    )
  if cores_per_chip == 1 and size not in _POD_SIZES:
    raise ValueError(f"--accelerator-type: {accelerator_type!r}: {m.group(1)} sizes are one of {_POD_SIZES}")
  n_chips = size // cores_per_chip
  return 1 if n_chips <= single_host_chips else n_chips // 4


# ---------------------------------------------------------------------------------------------------- shared pieces


def _train_argv(args: argparse.Namespace, python: str, config_file: str) -> list[str]:
  if not re.fullmatch(r"[A-Za-z0-9_]+", args.variant):
    raise ValueError(
        f"--variant must be a variant name of configs/onestory.py (e.g. {DEFAULT_VARIANT}), " f"got {args.variant!r}"
    )
  overrides = _key_values("--set", args.set, r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", "num_train_steps or mesh.shape")
  return [
      python,
      "-m",
      "onestory_jax.train",
      f"--config={config_file}:{args.variant}",
      f"--workdir={args.workdir}",
      *(f"--config.{k}={v}" for k, v in overrides),
  ]


def _env(args: argparse.Namespace, extra: Sequence[tuple[str, str]] = ()) -> list[str]:
  user = _key_values("--env", args.env, r"[A-Za-z_]\w*", "LIBTPU_INIT_ARGS or XLA_FLAGS")
  return [f"{k}={v}" for k, v in [("PYTHONUNBUFFERED", "1"), *extra, *user]]


def _detached(args: argparse.Namespace, env: Sequence[str]) -> list[str]:
  """Remote argv that starts the trainer detached in --repo-dir, logging to LOG_FILE there."""
  train = _train_argv(args, VENV_PYTHON, "configs/onestory.py")
  return [
      "setsid",
      "-f",
      "nohup",
      "bash",
      "-c",
      DETACH_SCRIPT,
      "onestory-train",
      args.repo_dir,
      LOG_FILE,
      "env",
      *env,
      *train,
  ]


def _setup_argv(args: argparse.Namespace, extra: str) -> list[str]:
  source = _positional("--repo-url", args.repo_url) if args.repo_url else REMOTE_TARBALL
  return [
      "bash",
      "-c",
      SETUP_SCRIPT,
      "onestory-setup",
      args.repo_dir,
      extra,
      source,
      _positional("--repo-ref", args.repo_ref),
      args.python_version,
  ]


def _pack(runner: Runner, args: argparse.Namespace) -> bool:
  """Packs the local checkout (--src-dir) when no --repo-url is given; returns whether it did."""
  if args.repo_url:
    return False
  excludes = [f"--exclude={p}" for p in ("./.venv", "./.git", "./workdirs", "./out", "__pycache__")]
  runner.run(["tar", "-czf", LOCAL_TARBALL, *excludes, "-C", args.src_dir, "."])
  return True


def _tail_argv(args: argparse.Namespace) -> list[str]:
  return ["tail", "-n", str(args.lines), "-F", f"{args.repo_dir}/{LOG_FILE}"]


# ---------------------------------------------------------------------------------------------------- TPU verbs


def _gcloud_tpu(
    args: argparse.Namespace, group: str, verb: str, *flags: str, positionals: Sequence[str] = ()
) -> list[str]:
  """``gcloud compute tpus GROUP VERB NAME FLAGS --zone --project`` (POSITIONALS replace NAME, e.g. for scp)."""
  name = _positional("--name", args.name)
  project = [f"--project={args.project}"] if args.project else []
  return [
      "gcloud",
      "compute",
      "tpus",
      group,
      verb,
      *(positionals or [name]),
      *flags,
      f"--zone={_positional('--zone', args.zone)}",
      *project,
  ]


def _tpu_ssh(args: argparse.Namespace, worker: str, remote: Sequence[str]) -> list[str]:
  return _gcloud_tpu(args, "tpu-vm", "ssh", f"--worker={worker}", "--command=" + shlex.join(remote))


def tpu_create(args: argparse.Namespace, runner: Runner) -> None:
  if args.spot and args.reserved:
    raise ValueError("--spot and --reserved are mutually exclusive: pick one (or neither, for on-demand)")
  tpu_hosts(args.accelerator_type)
  runtime = args.runtime_version or chips.of_accelerator_prefix(args.accelerator_type.split("-")[0]).runtime_version
  tier = ["--spot"] if args.spot else ["--reserved"] if args.reserved else []
  runner.run(
      _gcloud_tpu(
          args,
          "queued-resources",
          "create",
          f"--node-id={args.name}",
          f"--accelerator-type={args.accelerator_type}",
          f"--runtime-version={runtime}",
          *tier,
      )
  )


def tpu_status(args: argparse.Namespace, runner: Runner) -> None:
  runner.run(_gcloud_tpu(args, "queued-resources", "describe"))


def tpu_setup(args: argparse.Namespace, runner: Runner) -> None:
  if _pack(runner, args):
    runner.run(
        _gcloud_tpu(args, "tpu-vm", "scp", "--worker=all", positionals=[LOCAL_TARBALL, f"{args.name}:{REMOTE_TARBALL}"])
    )
  runner.run(_tpu_ssh(args, "all", _setup_argv(args, "tpu")))


def tpu_train(args: argparse.Namespace, runner: Runner) -> None:
  _gcs_path("--workdir", args.workdir)
  runner.run(_tpu_ssh(args, "all", _detached(args, _env(args))))


def tpu_logs(args: argparse.Namespace, runner: Runner) -> None:
  workers = args.workers or (tpu_hosts(args.accelerator_type) if args.accelerator_type else 0)
  if workers < 1:
    raise ValueError("--accelerator-type or --workers (a positive number of TPU VM workers) is required for logs")
  runner.stream([(f"[worker {i}] ", _tpu_ssh(args, str(i), _tail_argv(args))) for i in range(workers)])


def tpu_kill(args: argparse.Namespace, runner: Runner) -> None:
  runner.run(_tpu_ssh(args, "all", ["bash", "-c", KILL_TPU_SCRIPT]))


def tpu_stop(args: argparse.Namespace, runner: Runner) -> None:
  runner.run(_gcloud_tpu(args, "tpu-vm", "stop"))


def tpu_delete(args: argparse.Namespace, runner: Runner) -> None:
  runner.run(_gcloud_tpu(args, "queued-resources", "delete", "--force", "--quiet"))


# ---------------------------------------------------------------------------------------------------- GPU verbs


def _hosts(args: argparse.Namespace) -> list[str]:
  return [_positional("--hosts", h) for h in args.hosts.split(",")] if args.hosts else []


def _ssh(host: str, remote: Sequence[str]) -> list[str]:
  return ["ssh", "-o", "BatchMode=yes", "--", host, shlex.join(remote)]


def gpu_setup(args: argparse.Namespace, runner: Runner) -> None:
  hosts = _hosts(args)
  if not hosts:  # this node: install the local checkout into the active Python (3.11)
    runner.run([args.python, "-m", "pip", "install", "-e", f"{args.src_dir}[gpu]"])
    return
  packed = _pack(runner, args)
  for host in hosts:
    if packed:
      runner.run(["scp", "-q", "-o", "BatchMode=yes", "--", LOCAL_TARBALL, f"{host}:{REMOTE_TARBALL}"])
    runner.run(_ssh(host, _setup_argv(args, "gpu")))


def gpu_train(args: argparse.Namespace, runner: Runner) -> None:
  hosts = _hosts(args)
  if not args.workdir:
    raise ValueError("--workdir must be a non-empty path (gs://BUCKET/PATH or a directory)")
  if not hosts:  # one process drives every GPU of this node; runs in the foreground
    train = _train_argv(args, args.python, os.path.join(args.src_dir, "configs", "onestory.py"))
    runner.run(["env", *_env(args), *train])
    return
  if not (args.workdir.startswith("gs://") or args.workdir.startswith("/")):
    raise ValueError(
        f"--workdir must be gs://BUCKET/PATH or an absolute path on a filesystem shared by all hosts "
        f"when --hosts lists several nodes, got {args.workdir!r}"
    )
  if args.workdir.startswith("gs://"):
    _gcs_path("--workdir", args.workdir)
  coordinator = args.coordinator or f"{hosts[0].rsplit('@', 1)[-1]}:{args.coordinator_port}"
  for i, host in enumerate(hosts):
    env = _env(
        args,
        [("JAX_COORDINATOR_ADDRESS", coordinator), ("JAX_NUM_PROCESSES", str(len(hosts))), ("JAX_PROCESS_ID", str(i))],
    )
    runner.run(_ssh(host, _detached(args, env)))


def gpu_logs(args: argparse.Namespace, runner: Runner) -> None:
  hosts = _hosts(args)
  if not hosts:
    raise ValueError("--hosts is required for logs (a single-node run prints to the terminal)")
  runner.stream([(f"[host {i}] ", _ssh(h, _tail_argv(args))) for i, h in enumerate(hosts)])


def gpu_kill(args: argparse.Namespace, runner: Runner) -> None:
  remote = ["bash", "-c", KILL_GPU_SCRIPT]
  for host in _hosts(args) or [None]:
    runner.run(_ssh(host, remote) if host else remote)


# ---------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="launch/cli.py", description=__doc__.split("\n\n")[0].strip())
  platforms = parser.add_subparsers(dest="platform", required=True)

  def verb(group, name: str, func: Callable, help_: str) -> argparse.ArgumentParser:
    p = group.add_parser(name, help=help_)
    p.set_defaults(func=func)
    p.add_argument("--dry-run", action="store_true", help="print the commands, one per line, and run nothing")
    return p

  def tpu(p):
    p.add_argument("--name", required=True, help="queued resource and TPU VM (node) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None, help="GCP project (default: gcloud's configured project)")

  def remote(p):
    p.add_argument("--repo-dir", default="onestory_jax", help="checkout on each worker, relative to its home")

  def setup(p):
    remote(p)
    p.add_argument("--repo-url", default=None, help="git URL to clone on each worker (default: copy --src-dir)")
    p.add_argument("--repo-ref", default="main", help="branch, tag or commit of --repo-url")
    p.add_argument("--src-dir", default=REPO_ROOT, help="local checkout to copy when no --repo-url is given")
    p.add_argument("--python-version", default="3.11", help="Python of the workers' .venv (installed with uv)")

  def train(p):
    remote(p)
    p.add_argument("--variant", default=DEFAULT_VARIANT, help="variant of configs/onestory.py")
    p.add_argument("--workdir", required=True, help="checkpoints and summaries (gs:// on TPU)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, passed as --config.KEY=VALUE")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="environment variable for the trainer")

  def logs(p):
    remote(p)
    p.add_argument("--lines", type=int, default=100, help="lines of history before following")

  g = platforms.add_parser("tpu", help="Cloud TPU VM slices through gcloud").add_subparsers(dest="verb", required=True)
  p = verb(g, "create", tpu_create, "queue a TPU slice (queued resource)")
  tpu(p)
  p.add_argument("--accelerator-type", required=True, help="e.g. v5p-128, v6e-64")
  p.add_argument("--runtime-version", default=None, help="TPU VM image (default: the family's v2-alpha image)")
  p.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
  p.add_argument("--reserved", action="store_true", help="capacity from the project's reservation")
  for name, func, help_, extra in (
      ("status", tpu_status, "show the queued resource's state (wait for ACTIVE before setup)", None),
      ("setup", tpu_setup, "copy or clone the repo and pip install -e '.[tpu]' on all workers", setup),
      ("train", tpu_train, "start the trainer detached on every worker", train),
      ("logs", tpu_logs, "follow every worker's log, prefixed by its index", logs),
      ("kill", tpu_kill, "kill processes holding the TPU chips, and stale trainers, on all workers", None),
      ("stop", tpu_stop, "stop the TPU VM", None),
      ("delete", tpu_delete, "delete the queued resource and its TPU VM", None),
  ):
    p = verb(g, name, func, help_)
    tpu(p)
    if extra:
      extra(p)
  p = g.choices["logs"]
  p.add_argument("--accelerator-type", default=None, help="slice type, to count its workers")
  p.add_argument("--workers", type=int, default=0, help="number of workers (instead of --accelerator-type)")

  g = platforms.add_parser("gpu", help="GPU nodes: this node, or several over ssh").add_subparsers(
      dest="verb", required=True
  )
  for name, func, help_, extra in (
      ("setup", gpu_setup, "pip install -e '.[gpu]' here, or on every --hosts node", setup),
      ("train", gpu_train, "train here (all local GPUs), or on every --hosts node with the JAX coordinator env", train),
      ("logs", gpu_logs, "follow every host's log, prefixed by its index", logs),
      ("kill", gpu_kill, "kill stale trainers here or on every --hosts node", remote),
  ):
    p = verb(g, name, func, help_)
    extra(p)
    p.add_argument("--hosts", default="", help="comma-separated ssh destinations; process i runs on host i")
    p.add_argument("--python", default="python", help="Python for runs on this node (no --hosts)")
  p = g.choices["train"]
  p.add_argument("--src-dir", default=REPO_ROOT, help="checkout whose configs/ a run on this node uses")
  p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (default: first host, --coordinator-port)")
  p.add_argument("--coordinator-port", type=int, default=8476)
  return parser


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> Runner:
  """Parses ``argv`` and runs the verb through ``runner``; bad flag values raise ValueError naming the flag."""
  args = _parser().parse_args(argv)
  runner = runner or Runner(dry_run=args.dry_run)
  args.func(args, runner)
  return runner


if __name__ == "__main__":
  try:
    main()
  except ValueError as e:
    sys.exit(f"launch/cli.py: error: {e}")
  except subprocess.CalledProcessError as e:
    sys.exit(f"launch/cli.py: command failed with exit status {e.returncode}: {shlex.join(e.cmd)}")
  except KeyboardInterrupt:
    sys.exit(130)
