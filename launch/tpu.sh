#!/usr/bin/env bash
# Cloud TPU VMs for Titans: create, set up, run a config on every worker, follow logs, stop, delete.
#
#   launch/tpu.sh create --name=titans-v4 --zone=us-central2-b --type=v4-8 [--spot] [--queued] [--version=V]
#   launch/tpu.sh setup  --name=titans-v4 --zone=us-central2-b (--repo=GIT_URL [--branch=B] | --copy)
#   launch/tpu.sh run    --name=titans-v4 --zone=us-central2-b --config=configs/titans_cifar100.py:seed=0 \
#                        --workdir=gs://BUCKET/titans/cifar100_seed0 [--tfds_data_dir=gs://BUCKET/tfds] [-- --config.X=V ...]
#   launch/tpu.sh logs   --name=titans-v4 --zone=us-central2-b [--worker=0] [--run_name=NAME]
#   launch/tpu.sh stop   --name=titans-v4 --zone=us-central2-b
#   launch/tpu.sh delete --name=titans-v4 --zone=us-central2-b [--queued]
#
# Every command takes --project=P and --dry-run (print the exact gcloud commands, touch nothing).
# Pod slices (e.g. v4-32, v5litepod-16) have several workers: setup, run and stop act on all of them
# (--worker=all); every worker runs the same command and jax.distributed finds its peers itself.
# Spot/preemptible TPUs: re-running the same `run` command resumes from the newest checkpoint in
# --workdir. setup is idempotent: it can be re-run on a recreated or half-set-up VM.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"
USAGE="launch/tpu.sh {create|setup|run|logs|stop|delete} --name=NAME --zone=ZONE [--project=P] [--dry-run] [options; see the header of launch/tpu.sh]"

JAX_VERSION="0.10.2"

default_version() {  # TPU VM runtime image for an accelerator type
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die_usage "unsupported --type '$1': use v4-N, v5litepod-N, v5p-N or v6e-N" ;;
  esac
}

[ $# -ge 1 ] || die_usage "missing command"
CMD="$1"; shift
case "$CMD" in create|setup|run|logs|stop|delete) ;; -h|--help) echo "usage: $USAGE"; exit 0 ;;
  *) die_usage "unknown command '$CMD'" ;; esac

NAME="" ZONE="" PROJECT="" TYPE="" VERSION="" SPOT=0 QUEUED=0 REPO="" BRANCH="main" COPY=0
CONFIG="" WORKDIR="" TFDS_DATA_DIR="" WORKER="0" RUN_NAME=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --repo=*) REPO="${1#*=}" ;;
    --branch=*) BRANCH="${1#*=}" ;;
    --copy) COPY=1 ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --tfds_data_dir=*) TFDS_DATA_DIR="${1#*=}" ;;
    --worker=*) WORKER="${1#*=}" ;;
    --run_name=*) RUN_NAME="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die_usage "unknown option '$1'" ;;
  esac
  shift
done

need name "$NAME"; check_name name "$NAME"
need zone "$ZONE"
check_pattern zone "$ZONE" '^[a-z]+-[a-z]+[0-9]+-[a-z]$' "a zone like us-central2-b"
[ -z "$PROJECT" ] || check_pattern project "$PROJECT" '^[a-z][a-z0-9.:-]{1,62}$' "a Google Cloud project id"
[ -z "$VERSION" ] || check_pattern version "$VERSION" '^[A-Za-z0-9._-]+$' "a TPU runtime version"
[ -z "$REPO" ] || check_pattern repo "$REPO" '^(https://|ssh://|git@)[A-Za-z0-9._~:/@+-]+$' "a git URL (https://, ssh:// or git@)"
check_pattern branch "$BRANCH" '^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$' "a branch name"
[[ "$BRANCH" != *..* ]] || die_usage "--branch must not contain '..' (got '$BRANCH')"
[ -z "$CONFIG" ] || check_pattern config "$CONFIG" '^configs/[A-Za-z0-9_]+\.py(:[A-Za-z0-9_.,=/:@%+-]*)?$' \
  "configs/NAME.py[:ARG] with letters, digits and _ . , = / : @ % + - in ARG"
[ -z "$WORKDIR" ] || check_pattern workdir "$WORKDIR" '^gs://[a-z0-9][a-z0-9._-]*(/[A-Za-z0-9._=@+-]+)*/?$' \
  "a gs:// path, gs://BUCKET/PATH (every worker writes its checkpoint shards there)"
[ -z "$TFDS_DATA_DIR" ] || check_pattern tfds_data_dir "$TFDS_DATA_DIR" '^(gs://|/)[A-Za-z0-9._/=@+-]*$' \
  "a gs:// or absolute path"
check_pattern worker "$WORKER" '^([0-9]+|all)$' "a worker number"
check_overrides "${EXTRA[@]}"
GLOBAL=(--zone="$ZONE")
[ -n "$PROJECT" ] && GLOBAL+=(--project="$PROJECT")
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" "${GLOBAL[@]}")
RUN_NAME="${RUN_NAME:-titans}"
[[ "$RUN_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die_usage "--run_name may only hold letters, digits, _ . -"

case "$CMD" in
  create)
    need type "$TYPE"
    [[ "$TYPE" =~ ^v[0-9][a-z]*-[0-9]+$ ]] || die_usage "--type looks wrong: '$TYPE' (e.g. v4-8, v5litepod-16)"
    VERSION="${VERSION:-$(default_version "$TYPE")}"
    if [ "$QUEUED" -eq 1 ]; then
      ARGS=(gcloud compute tpus queued-resources create "$NAME-qr" --node-id="$NAME" "${GLOBAL[@]}"
            --accelerator-type="$TYPE" --runtime-version="$VERSION")
    else
      ARGS=(gcloud compute tpus tpu-vm create "$NAME" "${GLOBAL[@]}" --accelerator-type="$TYPE" --version="$VERSION")
    fi
    [ "$SPOT" -eq 1 ] && ARGS+=(--spot)
    run "${ARGS[@]}"
    ;;
  setup)
    # Idempotent on every worker: clone or update the code, make the venv, install the pinned packages.
    if [ "$COPY" -eq 1 ]; then
      run gcloud compute tpus tpu-vm scp --recurse "$(cd "$HERE/.." && pwd)" "$NAME":~/titans "${GLOBAL[@]}" --worker=all
      FETCH="true"
    else
      [ -n "$REPO" ] || die_usage "setup needs --repo=GIT_URL (cloned on every worker) or --copy (this checkout is copied)"
      B="$(quote_one "$BRANCH")"
      FETCH="if [ -d ~/titans/.git ]; then git -C ~/titans fetch -q origin $B && git -C ~/titans checkout -q $B && git -C ~/titans pull -q --ff-only; else git clone -q -b $B -- $(quote_one "$REPO") ~/titans; fi"
    fi
    REMOTE="set -e; $FETCH; cd ~/titans; [ -d .venv ] || python3 -m venv .venv; . .venv/bin/activate; pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION'; python -c 'import jax; print(jax.device_count(), jax.devices()[0].device_kind)'"
    run "${SSH[@]}" --worker=all --command="$REMOTE"
    ;;
  run)
    need config "$CONFIG"; need workdir "$WORKDIR"
    if [ -n "$TFDS_DATA_DIR" ]; then ENVS="TFDS_DATA_DIR=$(quote_one "$TFDS_DATA_DIR")"; else ENVS="TFDS_DATA_DIR=\$HOME/tensorflow_datasets"; fi
    MAIN="$(quote python -m titans.main --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")"
    REMOTE="cd ~/titans && . .venv/bin/activate && mkdir -p ~/titans_logs && $ENVS nohup $MAIN > ~/titans_logs/$RUN_NAME.log 2>&1 &"
    run "${SSH[@]}" --worker=all --command="$REMOTE"
    ;;
  logs)
    [[ "$WORKER" =~ ^[0-9]+$ ]] || die_usage "--worker must be a worker number"
    run "${SSH[@]}" --worker="$WORKER" --command="tail -n 100 -f ~/titans_logs/$RUN_NAME.log"
    ;;
  stop)
    # SIGTERM: the trainer saves a checkpoint and exits; the same `run` command resumes later.
    run "${SSH[@]}" --worker=all --command="pkill -TERM -f 'python -m titans.main' || true"
    ;;
  delete)
    if [ "$QUEUED" -eq 1 ]; then
      run gcloud compute tpus queued-resources delete "$NAME-qr" "${GLOBAL[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$NAME" "${GLOBAL[@]}" --quiet
    fi
    ;;
esac
