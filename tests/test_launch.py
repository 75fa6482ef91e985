"""Launch scripts: --dry-run prints the exact commands; bad arguments are refused with a usage line."""

import os
import shutil
import subprocess

import pytest
from helpers import REPO

TPU = os.path.join(REPO, "launch", "tpu.sh")
SLURM = os.path.join(REPO, "launch", "slurm.sh")
Z = "--zone=us-central2-b"


def _run(script, *args):
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=60)


def _with_dry_run(args):
    """--dry-run goes before a `--` (after it, arguments are config overrides for the run)."""
    args = list(args)
    at = args.index("--") if "--" in args else len(args)
    return args[:at] + ["--dry-run"] + args[at:]


def _dry(script, *args):
    proc = _run(script, *_with_dry_run(args))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["create", "--name=t1", Z, "--type=v4-8"],  # single host
            "gcloud compute tpus tpu-vm create t1 --zone=us-central2-b --accelerator-type=v4-8 --version=tpu-ubuntu2204-base",
        ),
        (
            ["create", "--name=pod", Z, "--type=v4-32", "--project=proj"],  # pod slice
            "gcloud compute tpus tpu-vm create pod --zone=us-central2-b --project=proj --accelerator-type=v4-32 "
            "--version=tpu-ubuntu2204-base",
        ),
        (
            ["create", "--name=s", "--zone=us-west4-a", "--type=v5litepod-16", "--spot"],  # spot
            "gcloud compute tpus tpu-vm create s --zone=us-west4-a --accelerator-type=v5litepod-16 "
            "--version=v2-alpha-tpuv5-lite --spot",
        ),
        (
            ["create", "--name=q", "--zone=us-east5-b", "--type=v6e-8", "--queued", "--spot"],  # queued resource
            "gcloud compute tpus queued-resources create q-qr --node-id=q --zone=us-east5-b --accelerator-type=v6e-8 "
            "--runtime-version=v2-alpha-tpuv6e --spot",
        ),
        (
            ["create", "--name=p", "--zone=us-east5-a", "--type=v5p-8", "--version=v2-alpha-tpuv5"],
            "gcloud compute tpus tpu-vm create p --zone=us-east5-a --accelerator-type=v5p-8 --version=v2-alpha-tpuv5",
        ),
        (["delete", "--name=t1", Z], "gcloud compute tpus tpu-vm delete t1 --zone=us-central2-b --quiet"),
        (
            ["delete", "--name=q", Z, "--queued"],
            "gcloud compute tpus queued-resources delete q-qr --zone=us-central2-b --force --quiet",
        ),
        (
            ["logs", "--name=pod", Z, "--worker=3", "--run_name=c100"],
            "gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=3 "
            "'--command=tail -n 100 -f ~/titans_logs/c100.log'",
        ),
        (
            ["stop", "--name=pod", Z],
            "gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=all "
            "'--command=pkill -TERM -f '\\''python -m titans.main'\\'' || true'",
        ),
    ],
)
def test_tpu_dry_run_commands(args, expected):
    assert _dry(TPU, *args) == [expected]


def test_tpu_run_and_setup_dry_run():
    (line,) = _dry(
        TPU,
        "run",
        "--name=pod",
        Z,
        "--config=configs/titans_cifar100.py:seed=1",
        "--workdir=gs://bucket/c100/seed1",
        "--tfds_data_dir=gs://bucket/tfds",
        "--run_name=c100",
        "--",
        "--config.batch_size=128",
    )
    assert line == (
        "gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=all '--command=cd ~/titans && "
        ". .venv/bin/activate && mkdir -p ~/titans_logs && TFDS_DATA_DIR=gs://bucket/tfds nohup python -m "
        "titans.main --config=configs/titans_cifar100.py:seed=1 --workdir=gs://bucket/c100/seed1 "
        "--config.batch_size=128 > ~/titans_logs/c100.log 2>&1 &'"
    )
    (line,) = _dry(TPU, "setup", "--name=pod", Z, "--repo=https://example.org/titans.git", "--branch=dev")
    assert line.startswith("gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=all '--command=set -e; ")
    assert "git clone -q -b dev -- https://example.org/titans.git ~/titans" in line  # first time
    assert "git -C ~/titans pull -q --ff-only" in line  # re-run: update in place (idempotent)
    assert "[ -d .venv ] || python3 -m venv .venv" in line and "jax[tpu]==0.10.2" in line
    lines = _dry(TPU, "setup", "--name=pod", Z, "--copy")
    assert (
        lines[0] == f"gcloud compute tpus tpu-vm scp --recurse {REPO} 'pod:~/titans' --zone=us-central2-b --worker=all"
    )
    # The printed command is valid shell that gives gcloud exactly one --command argument.
    (line,) = _dry(TPU, "stop", "--name=pod", Z)
    argv = subprocess.run(
        ["bash", "-c", f"set -- {line[len('gcloud ') :]}; printf '%s\\n' \"$@\""], capture_output=True, text=True
    ).stdout.splitlines()
    assert argv[-1] == "--command=pkill -TERM -f 'python -m titans.main' || true"


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "missing command"),
        (["launch", "--name=t", Z], "unknown command 'launch'"),
        (["create", Z, "--type=v4-8"], "missing --name"),
        (["create", "--name=t"], "missing --zone"),
        (["create", "--name=Bad_Name", Z, "--type=v4-8"], "--name must be lowercase"),
        (["create", "--name=t", "--zone=central", "--type=v4-8"], "--zone must be a zone like us-central2-b"),
        (["create", "--name=t", Z], "missing --type"),
        (["create", "--name=t", Z, "--type=v9x-8"], "unsupported --type"),
        (["create", "--name=t", Z, "--type=v4-8", "--spto"], "unknown option '--spto'"),
        (["setup", "--name=t", Z], "--repo=GIT_URL"),
        (["run", "--name=t", Z, "--config=configs/x.py"], "missing --workdir"),
        (["run", "--name=t", Z, "--config=configs/x.py", "--workdir=/local/dir"], "gs:// path"),
        (["run", "--name=t", Z, "--config=x.py", "--workdir=gs://b/w"], "--config must be configs/NAME.py"),
    ],
)
def test_tpu_bad_arguments_are_refused(args, message):
    proc = _run(TPU, *(_with_dry_run(args) if args else []))
    assert proc.returncode == 2 and message in proc.stderr and "usage: launch/tpu.sh" in proc.stderr
    assert proc.stdout == ""


def test_slurm_dry_run_script():
    lines = _dry(
        SLURM,
        "--nodes=2",
        "--gpus_per_node=8",
        "--config=configs/titans_cifar100.py:seed=0",
        "--workdir=/shared/w",
        "--partition=gpu",
        "--account=lab",
        "--time=12:00:00",
        "--venv=/shared/venv",
        "--",
        "--config.batch_size=256",
    )
    assert lines == [
        "# /shared/w/slurm/titans.sbatch",
        "#!/bin/bash",
        "#SBATCH --job-name=titans",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=12:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --output=/shared/w/slurm/%x-%j.out",
        "#SBATCH --requeue",
        "#SBATCH --signal=TERM@120",
        "set -euo pipefail",
        f"cd {REPO}",
        ". /shared/venv/bin/activate",
        'export TITANS_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):12355"',
        'export TITANS_NUM_PROCESSES="$SLURM_NNODES"',
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'TITANS_PROCESS_ID=$SLURM_PROCID exec python -m "
        "titans.main --config=configs/titans_cifar100.py:seed=0 --workdir=/shared/w --config.batch_size=256'",
        "# submit:",
        "sbatch /shared/w/slurm/titans.sbatch",
    ]
    assert not os.path.exists("/shared/w")  # a dry run touches nothing


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpus_per_node=8", "--config=configs/a.py", "--workdir=/w"], "missing --nodes"),
        (["--nodes=0", "--gpus_per_node=8", "--config=configs/a.py", "--workdir=/w"], "--nodes must be a positive"),
        (["--nodes=1", "--gpus_per_node=8", "--config=configs/a.py", "--workdir=rel/w"], "absolute path"),
        (["--nodes=1", "--gpus_per_node=8", "--config=configs/a.py", "--workdir=/w", "--time=2h"], "--time must be"),
        (["--nodes=1", "--gpus_per_node=8", "--config=configs/a.py", "--workdir=/w", "--gpu=8"], "unknown option"),
    ],
)
def test_slurm_bad_arguments_are_refused(args, message):
    proc = _run(SLURM, *_with_dry_run(args))
    assert proc.returncode == 2 and message in proc.stderr and "usage: launch/slurm.sh" in proc.stderr


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (CI installs it)")
    scripts = [
        os.path.join(REPO, "launch", f) for f in sorted(os.listdir(os.path.join(REPO, "launch"))) if f.endswith(".sh")
    ] + [os.path.join(REPO, ".ci", "run"), GPU_CHECKS]
    proc = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout


GPU_CHECKS = os.path.join(REPO, "benchmarks", "gpu_checks.sh")


def test_gpu_checks_refuses_a_missing_out_dir_and_an_unknown_section(tmp_path):
    """benchmarks/gpu_checks.sh needs OUT_DIR, and an unknown section stops it (exit 2) before it runs or
    records anything."""
    proc = subprocess.run(["bash", GPU_CHECKS], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "usage: benchmarks/gpu_checks.sh OUT_DIR" in proc.stderr
    out = tmp_path / "out"
    proc = subprocess.run(["bash", GPU_CHECKS, str(out), "no_such_section"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown section no_such_section" in proc.stderr
    assert not (out / "env.txt").exists() and proc.stdout == ""


PAYLOADS = ["x;touch /tmp/pwned", "$(touch /tmp/pwned)", "`touch /tmp/pwned`", "x\ntouch /tmp/pwned", "a b'c"]
TPU_RUN = ["run", "--name=pod", Z, "--config=configs/a.py:seed=0", "--workdir=gs://b/w", "--tfds_data_dir=gs://b/t"]
TPU_SETUP = ["setup", "--name=pod", Z, "--repo=https://example.org/t.git", "--branch=main", "--project=my-proj"]
SLURM_ARGS = [
    "--nodes=1",
    "--gpus_per_node=8",
    "--config=configs/a.py:seed=0",
    "--workdir=/shared/w",
    "--partition=gpu",
    "--account=lab",
    "--job_name=titans",
    "--venv=/shared/venv",
    "--port=12355",
    "--time=01:00:00",
]


def _injected(base, index, payload):
    """`base` with the value of argument `index` replaced by one that carries a payload."""
    args = list(base)
    key = args[index].split("=", 1)[0]
    args[index] = f"{key}={payload}" if key.startswith("--") and "=" in args[index] else payload
    return args


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("script, base", [(TPU, TPU_RUN), (TPU, TPU_SETUP), (SLURM, SLURM_ARGS)])
def test_every_argument_refuses_shell_metacharacters(script, base, payload):
    """A `;`, `$(...)`, backticks, a newline or a quote in any argument value is refused (exit 2,
    nothing printed), so nothing can reach a remote command or a batch script as a second command."""
    assert _run(script, *_with_dry_run(base)).returncode == 0  # the base arguments are fine
    indices = [i for i, a in enumerate(base) if a.startswith("--") and "=" in a]
    for i in indices:
        proc = _run(script, *_with_dry_run(_injected(base, i, payload)))
        assert proc.returncode == 2, (base[i], payload, proc.stdout)
        assert proc.stdout == "" and "error:" in proc.stderr
    # and in a config override after `--`
    proc = _run(script, *_with_dry_run([*base, "--", f"--config.batch_size=1{payload}"]))
    assert proc.returncode == 2 and proc.stdout == ""
    assert not os.path.exists("/tmp/pwned")
