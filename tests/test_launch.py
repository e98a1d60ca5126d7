"""launch/cli.py: golden dry-runs of every verb, quoting of hostile values, and clear errors for bad flags.

Nothing here runs gcloud or ssh: dry-run tests replace the module's subprocess with one that fails when called. The
quoting tests let a real bash parse the printed commands (``set -- CMD``), so shell semantics, not just Python's
shlex, show that hostile values stay single arguments and that nothing in them executes.

Regenerate the goldens after an intended change with ``UPDATE_GOLDEN=1 python -m pytest tests/test_launch.py``.
"""

import io
import os
import shlex
import subprocess
import sys
import time
import types

import pytest

from launch import cli

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "launch")
TPU = ["--name=onestory-v5p", "--zone=us-east5-a", "--project=my-project"]
HOSTS = "--hosts=gpu-node-0,alice@gpu-node-1"

GOLDEN_CASES = {
    "tpu_create": ["tpu", "create", *TPU, "--accelerator-type=v5p-128", "--spot"],
    "tpu_create_reserved": ["tpu", "create", *TPU, "--accelerator-type=v6e-64", "--reserved"],
    "tpu_status": ["tpu", "status", *TPU],
    "tpu_setup": ["tpu", "setup", *TPU, "--src-dir=/src/onestory_jax"],
    "tpu_setup_git": [
        "tpu",
        "setup",
        *TPU,
        "--repo-url=https://github.com/example/onestory_jax.git",
        "--repo-ref=v0.1.0",
    ],
    "tpu_train": [
        "tpu",
        "train",
        *TPU,
        "--workdir=gs://my-bucket/runs/v5p-128",
        "--set=num_train_steps=20000",
        "--set=mesh.shape=(1,-1,1,1)",
        "--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true",
    ],
    "tpu_logs": ["tpu", "logs", *TPU, "--accelerator-type=v5p-32"],
    "tpu_kill": ["tpu", "kill", *TPU],
    "tpu_stop": ["tpu", "stop", *TPU],
    "tpu_delete": ["tpu", "delete", *TPU],
    "gpu_setup": ["gpu", "setup", HOSTS, "--src-dir=/src/onestory_jax"],
    "gpu_setup_local": ["gpu", "setup", "--src-dir=/src/onestory_jax"],
    "gpu_train": ["gpu", "train", HOSTS, "--workdir=gs://my-bucket/runs/gpu", "--set=num_train_steps=20000"],
    "gpu_train_local": [
        "gpu",
        "train",
        "--src-dir=/src/onestory_jax",
        "--workdir=/data/runs/gpu",
        "--set=num_train_steps=20000",
    ],
    "gpu_logs": ["gpu", "logs", HOSTS],
    "gpu_kill": ["gpu", "kill", HOSTS],
    "gpu_kill_local": ["gpu", "kill"],
}


# The detached start that the train verbs wrap the trainer in, up to the repo directory.
DETACH = ["setsid", "-f", "nohup", "bash", "-c", cli.DETACH_SCRIPT, "onestory-train"]


@pytest.fixture(autouse=True)
def no_subprocess(monkeypatch):
  """Any attempt by the CLI to run a command fails the test."""

  def fail(*args, **kwargs):
    raise AssertionError(f"launch/cli.py tried to run {args}")

  monkeypatch.setattr(
      cli,
      "subprocess",
      types.SimpleNamespace(
          run=fail,
          Popen=fail,
          PIPE=subprocess.PIPE,
          STDOUT=subprocess.STDOUT,
          CalledProcessError=subprocess.CalledProcessError,
      ),
  )


def dry_run(argv):
  out = io.StringIO()
  runner = cli.main([*argv, "--dry-run"], runner=cli.Runner(dry_run=True, out=out))
  return out.getvalue(), runner.commands


def bash_words(command: str) -> list[str]:
  """The words bash makes of ``command`` (as a login shell would for ssh), without running any of them."""
  script = "set -- " + command + "\nprintf '%s\\0' \"$@\""
  res = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True, check=True)
  return res.stdout.decode().split("\0")[:-1]


def remote_command(argv: list[str]) -> str:
  if argv[0] == "gcloud":
    (cmd,) = [a for a in argv if a.startswith("--command=")]
    return cmd[len("--command=") :]
  assert argv[:4] == ["ssh", "-o", "BatchMode=yes", "--"], argv
  return argv[-1]


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden_dry_run(case):
  text, commands = dry_run(GOLDEN_CASES[case])
  assert commands and text == "".join(shlex.join(c) + "\n" for c in commands)
  path = os.path.join(GOLDEN_DIR, f"{case}.txt")
  if os.environ.get("UPDATE_GOLDEN") == "1":
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
  with open(path) as f:
    assert text == f.read(), f"dry-run of {case} differs from {path} (UPDATE_GOLDEN=1 regenerates it)"


def test_golden_commands_parse_back_exactly():
  """Every golden line, and every remote command inside it, is read by bash as exactly the argv that was built."""
  for case, argv in GOLDEN_CASES.items():
    for command in dry_run(argv)[1]:
      assert bash_words(shlex.join(command)) == command, case
      if command[0] == "ssh" or any(a.startswith("--command=") for a in command):
        assert bash_words(remote_command(command)) == shlex.split(remote_command(command)), case


def test_tpu_train_runs_the_trainer_detached_on_all_workers():
  ((command,),) = [dry_run(GOLDEN_CASES["tpu_train"])[1]]
  assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "onestory-v5p"] and "--worker=all" in command
  remote = shlex.split(remote_command(command))
  assert remote[:6] == ["setsid", "-f", "nohup", "bash", "-c", cli.DETACH_SCRIPT]
  assert remote[6:9] == ["onestory-train", "onestory_jax", cli.LOG_FILE]
  train = remote[remote.index(cli.VENV_PYTHON) :]
  assert train == [
      cli.VENV_PYTHON,
      "-m",
      "onestory_jax.train",
      "--config=configs/onestory.py:wan21_i2v_14b_480p",
      "--workdir=gs://my-bucket/runs/v5p-128",
      "--config.num_train_steps=20000",
      "--config.mesh.shape=(1,-1,1,1)",
  ]


def test_gpu_multi_node_sets_the_coordinator_environment_per_process():
  commands = dry_run(GOLDEN_CASES["gpu_train"])[1]
  assert [c[4] for c in commands] == ["gpu-node-0", "alice@gpu-node-1"]
  for i, command in enumerate(commands):
    remote = shlex.split(remote_command(command))
    env = remote[remote.index("env") + 1 : remote.index(cli.VENV_PYTHON)]
    assert env == [
        "PYTHONUNBUFFERED=1",
        "JAX_COORDINATOR_ADDRESS=gpu-node-0:8476",
        "JAX_NUM_PROCESSES=2",
        f"JAX_PROCESS_ID={i}",
    ]


def test_tpu_hosts_per_slice():
  assert {t: cli.tpu_hosts(t) for t in ("v5p-8", "v5p-32", "v5p-128", "v4-32", "v6e-8", "v6e-64", "v5litepod-16")} == {
      "v5p-8": 1,
      "v5p-32": 4,
      "v5p-128": 16,
      "v4-32": 4,
      "v6e-8": 1,
      "v6e-64": 16,
      "v5litepod-16": 4,
  }
  assert len(dry_run(["tpu", "logs", *TPU, "--workers=3"])[1]) == 3


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_hostile_values_are_quoted_and_never_injected(tmp_path, platform):
  canary = tmp_path / "pwned"
  hostile = (
      f"x y 'q' \"dq\"; touch {canary}; $(touch {canary}) `touch {canary}` ${{HOME}}\n" f"touch {canary} && echo done"
  )
  workdir = "gs://my-bucket/runs/" + hostile
  common = [f"--workdir={workdir}", f"--set=pretrained={hostile}", f"--repo-dir={hostile}"]
  if platform == "tpu":
    argv = ["tpu", "train", f"--name={hostile}", "--zone=us-east5-a", *common]
  else:
    argv = ["gpu", "train", f"--hosts=node-0,{hostile}", *common]
  text, commands = dry_run(argv)
  # (a) The printed output is exactly the shlex-quoted form, and bash reads each command back as its argv.
  assert text == "".join(shlex.join(c) + "\n" for c in commands)
  for command in commands:
    assert bash_words(shlex.join(command)) == command
  destination = commands[-1][5] if platform == "tpu" else commands[-1][4]
  assert destination == hostile
  # (b) The remote command string parses back (shlex and bash agree) to exactly the intended argv.
  remote = remote_command(commands[-1])
  expected = [
      *DETACH,
      hostile,
      cli.LOG_FILE,
      "env",
      "PYTHONUNBUFFERED=1",
  ]
  if platform == "gpu":
    expected += ["JAX_COORDINATOR_ADDRESS=node-0:8476", "JAX_NUM_PROCESSES=2", "JAX_PROCESS_ID=1"]
  expected += [
      cli.VENV_PYTHON,
      "-m",
      "onestory_jax.train",
      "--config=configs/onestory.py:wan21_i2v_14b_480p",
      f"--workdir={workdir}",
      f"--config.pretrained={hostile}",
  ]
  assert shlex.split(remote) == expected
  assert bash_words(remote) == expected
  assert not canary.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tpu", "train", *TPU, "--workdir=/local/run"], "--workdir must be a GCS path"),
        (["tpu", "train", *TPU, "--workdir=s3://bucket/run"], "--workdir must be a GCS path"),
        (["tpu", "create", *TPU, "--accelerator-type=v9z-64"], "--accelerator-type: unknown accelerator type 'v9z-64'"),
        (["tpu", "create", *TPU, "--accelerator-type=v5p-12"], "--accelerator-type: 'v5p-12'"),
        (["tpu", "create", *TPU, "--accelerator-type=v6e-12"], "--accelerator-type: 'v6e-12'"),
        (
            ["tpu", "create", *TPU, "--accelerator-type=v5p-128", "--spot", "--reserved"],
            "--spot and --reserved are mutually exclusive",
        ),
        (["tpu", "train", *TPU, "--workdir=gs://my-bucket/r", "--set=num_train_steps"], "--set expects KEY=VALUE"),
        (["tpu", "train", *TPU, "--workdir=gs://my-bucket/r", "--set=a b=1"], "--set expects KEY=VALUE"),
        (["tpu", "train", *TPU, "--workdir=gs://my-bucket/r", "--env=A-B=1"], "--env expects KEY=VALUE"),
        (["tpu", "train", *TPU, "--workdir=gs://my-bucket/r", "--variant=x;y"], "--variant must be"),
        (
            ["tpu", "kill", "--name=-oProxyCommand=x", "--zone=z"],
            "--name must be non-empty and must not start with '-'",
        ),
        (["tpu", "setup", *TPU, "--repo-url=https://h/r.git", "--repo-ref=--upload-pack=x"], "--repo-ref must"),
        (["tpu", "logs", *TPU], "--accelerator-type or --workers"),
        (["gpu", "kill", "--hosts=a,-oProxyCommand=x"], "--hosts must be non-empty"),
        (
            ["gpu", "train", "--hosts=a,b", "--workdir=runs/gpu"],
            "--workdir must be gs://BUCKET/PATH or an absolute path",
        ),
        (["gpu", "logs"], "--hosts is required for logs"),
    ],
)
def test_bad_input_names_the_flag(argv, message):
  with pytest.raises(ValueError) as err:
    dry_run(argv)
  assert message in str(err.value)


def test_cli_reports_errors_without_a_traceback():
  res = subprocess.run(
      [
          sys.executable,
          os.path.join(cli.REPO_ROOT, "launch", "cli.py"),
          "tpu",
          "train",
          *TPU,
          "--workdir=/local/run",
          "--dry-run",
      ],
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert res.returncode != 0 and res.stdout == ""
  assert "error: --workdir must be a GCS path" in res.stderr and "Traceback" not in res.stderr


def test_runner_runs_and_streams_with_prefixes(monkeypatch):
  monkeypatch.setattr(cli, "subprocess", subprocess)  # a real run, of python itself (never gcloud or ssh)
  out = io.StringIO()
  runner = cli.Runner(dry_run=False, out=out)
  runner.run([sys.executable, "-c", "pass"])
  runner.stream([(f"[worker {i}] ", [sys.executable, "-c", f"print('a{i}'); print('b{i}')"]) for i in range(2)])
  assert sorted(out.getvalue().splitlines()) == ["[worker 0] a0", "[worker 0] b0", "[worker 1] a1", "[worker 1] b1"]
  with pytest.raises(subprocess.CalledProcessError):
    runner.run([sys.executable, "-c", "raise SystemExit(3)"])
  with pytest.raises(subprocess.CalledProcessError):
    runner.stream([("", [sys.executable, "-c", "raise SystemExit(4)"])])


@pytest.mark.parametrize("script", ["SETUP_SCRIPT", "DETACH_SCRIPT", "KILL_TPU_SCRIPT", "KILL_GPU_SCRIPT"])
def test_fixed_scripts_are_valid_bash_without_newlines(script):
  text = getattr(cli, script)
  assert "\n" not in text  # one command per dry-run line
  subprocess.run(["bash", "-n", "-c", text], check=True)


def test_detached_start_runs_in_the_repo_dir_and_appends_to_the_log(tmp_path):
  """The exact detach wrapper the train verbs send, run here on a harmless command instead of the trainer."""
  repo = tmp_path / "repo dir; $(x)"
  repo.mkdir()
  child = "import os, sys; print(os.getcwd(), os.environ['FOO'], sys.argv[1:])"
  argv = [
      *DETACH,
      str(repo),
      cli.LOG_FILE,
      "env",
      "FOO=a b",
      sys.executable,
      "-c",
      child,
      "--workdir=gs://b/x y",
  ]
  for _ in range(2):
    subprocess.run(argv, check=True, timeout=30)  # returns at once; the child runs in its own session
  log = repo / cli.LOG_FILE
  for _ in range(300):
    if log.exists() and len(log.read_text().splitlines()) == 2:
      break
    time.sleep(0.05)
  assert log.read_text().splitlines() == [f"{repo} a b ['--workdir=gs://b/x y']"] * 2
