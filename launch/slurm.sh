#!/usr/bin/env bash
# A multi-node GPU run of Titans under Slurm: one process per node, all of the node's GPUs in it.
#
#   launch/slurm.sh --nodes=2 --gpus_per_node=8 --config=configs/titans_cifar100.py:seed=0 \
#       --workdir=/shared/titans/cifar100_seed0 [--partition=P] [--account=A] [--time=24:00:00] \
#       [--job_name=titans] [--venv=/shared/titans/.venv] [--port=12355] [--dry-run] [-- --config.X=V ...]
#
# Writes the batch script to WORKDIR/slurm/JOB_NAME.sbatch and submits it with sbatch; --dry-run
# prints the script and the sbatch command instead and touches nothing. The job is requeued when
# preempted and gets SIGTERM 120 s before its time limit; the trainer then saves a checkpoint, and the
# requeued (or re-submitted) job resumes from it. WORKDIR must be on a filesystem every node sees.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"
USAGE="launch/slurm.sh --nodes=N --gpus_per_node=G --config=configs/NAME.py[:ARG] --workdir=DIR [--partition=P] [--account=A] [--time=HH:MM:SS] [--job_name=NAME] [--venv=DIR] [--port=PORT] [--dry-run] [-- overrides]"

NODES="" GPUS="" CONFIG="" WORKDIR="" PARTITION="" ACCOUNT="" TIME="24:00:00" JOB_NAME="titans" PORT="12355"
REPO="$(cd "$HERE/.." && pwd)"
VENV="$REPO/.venv"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus_per_node=*) GPUS="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --job_name=*) JOB_NAME="${1#*=}" ;;
    --venv=*) VENV="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) echo "usage: $USAGE"; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die_usage "unknown option '$1'" ;;
  esac
  shift
done

need nodes "$NODES"; need gpus_per_node "$GPUS"; need config "$CONFIG"; need workdir "$WORKDIR"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die_usage "--nodes must be a positive integer (got '$NODES')"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die_usage "--gpus_per_node must be a positive integer (got '$GPUS')"
if ! [[ "$PORT" =~ ^[0-9]{1,5}$ ]] || [ "$PORT" -lt 1024 ] || [ "$PORT" -gt 65535 ]; then
  die_usage "--port must be a number in 1024-65535 (got '$PORT')"
fi
[[ "$TIME" =~ ^([0-9]+-)?[0-9]{1,2}:[0-9]{2}:[0-9]{2}$ ]] || die_usage "--time must be [D-]HH:MM:SS (got '$TIME')"
check_pattern config "$CONFIG" '^configs/[A-Za-z0-9_]+\.py(:[A-Za-z0-9_.,=/:@%+-]*)?$' \
  "configs/NAME.py[:ARG] with letters, digits and _ . , = / : @ % + - in ARG"
check_pattern workdir "$WORKDIR" '^/[A-Za-z0-9._/=@+-]*$' "an absolute path on a shared filesystem, of letters, digits and _ . / = @ + -"
check_pattern venv "$VENV" '^/[A-Za-z0-9._/=@+-]*$' "an absolute path of letters, digits and _ . / = @ + -"
check_pattern job_name "$JOB_NAME" '^[A-Za-z0-9_.-]+$' "letters, digits, _ . -"
[ -z "$PARTITION" ] || check_pattern partition "$PARTITION" '^[A-Za-z0-9_.-]+$' "letters, digits, _ . -"
[ -z "$ACCOUNT" ] || check_pattern account "$ACCOUNT" '^[A-Za-z0-9_.-]+$' "letters, digits, _ . -"
check_overrides "${EXTRA[@]}"

MAIN="$(quote python -m titans.main --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")"
SCRIPT="$WORKDIR/slurm/$JOB_NAME.sbatch"

sbatch_script() {
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$GPUS"
  echo "#SBATCH --time=$TIME"
  [ -n "$PARTITION" ] && echo "#SBATCH --partition=$PARTITION"
  [ -n "$ACCOUNT" ] && echo "#SBATCH --account=$ACCOUNT"
  echo "#SBATCH --output=$WORKDIR/slurm/%x-%j.out"  # validated above: no spaces, quotes or newlines
  echo "#SBATCH --requeue"
  echo "#SBATCH --signal=TERM@120"
  echo "set -euo pipefail"
  echo "cd $(quote_one "$REPO")"
  echo ". $(quote_one "$VENV")/bin/activate"
  echo "export TITANS_COORDINATOR_ADDRESS=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n 1):$PORT\""
  echo "export TITANS_NUM_PROCESSES=\"\$SLURM_NNODES\""
  echo "srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c $(quote_one "TITANS_PROCESS_ID=\$SLURM_PROCID exec $MAIN")"
}

if [ "$DRY_RUN" -eq 1 ]; then
  echo "# $SCRIPT"
  sbatch_script
  echo "# submit:"
  quote sbatch "$SCRIPT"
  echo
else
  mkdir -p "$WORKDIR/slurm"
  sbatch_script > "$SCRIPT"
  run sbatch "$SCRIPT"
fi
