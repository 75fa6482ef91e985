#!/usr/bin/env bash
# The GPU runs of docs/benchmarks.md, in one go, in order of what they decide (each section has its own
# time limit, and a failed or cut section does not stop the rest):
#
#   1. pool_speed --device gpu         the training pool forms on the GPU: time, XLA's FLOPs and bytes, and
#                                      the kernels each compiles to (issue 16: the CPU form must not be worse
#                                      on GPU), for the pool alone and the CNN teacher's training pass;
#   2. step_speed --device gpu         the Fashion-MNIST pair's three training steps against PyTorch (eager,
#                                      and torch.compile), batch 128, float32;
#   3. cascade_speed                   the cascade runner on the GPU backend, the Fashion-MNIST CNN pair and
#                                      the CIFAR ResNet-56 -> ResNet-20 pair (random weights; the power-of-two
#                                      capacities only: every capacity is one more compilation);
#   4. step_speed --device gpu         the CIFAR pair's steps against eager PyTorch (no numerics check and no
#                                      tuned side: ResNet-56's compilations are what take the time).
#
#     benchmarks/gpu_checks.sh OUT_DIR [SECTION...]     # sections: pool_speed step_speed_fmnist
#                                                        # cascade_speed_fmnist cascade_speed_cifar step_speed_cifar
#
# Writes each benchmark's record (OUT_DIR/<benchmark>/<device>.json; copy it to benchmarks/results/ and run
# `python -m benchmarks report` to publish it) and an env.txt (GPU, driver, versions, the GPU's other processes before and
# after) into OUT_DIR; the tables go to stdout. Needs the packages of requirements.txt with a CUDA jax and a
# CUDA torch.
set -u -o pipefail
out=${1:?usage: benchmarks/gpu_checks.sh OUT_DIR}
mkdir -p -- "$out" && out=$(cd -- "$out" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1

section() {  # section NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    return 0
}

all_sections=(pool_speed step_speed_fmnist cascade_speed_fmnist cascade_speed_cifar step_speed_cifar)
shift
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=("${all_sections[@]}")
for name in "${sections[@]}"; do
    if [[ " ${all_sections[*]} " != *" $name "* ]]; then
        echo "unknown section $name (sections: ${all_sections[*]})" >&2
        exit 2
    fi
done

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,utilization.gpu,memory.used --format=csv
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
    nproc
    python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

for name in "${sections[@]}"; do
    case $name in
    pool_speed)
        section "$name" 80 python3 -m benchmarks run pool_speed --device gpu --repeats 50 --results_dir "$out" ;;
    step_speed_fmnist)
        section "$name" 170 python3 -m benchmarks run step_speed --device gpu --steps 30 --repeats 5 \
            --results_dir "$out" ;;
    cascade_speed_fmnist)
        section "$name" 70 python3 -m benchmarks run cascade_speed --capacities pow2 --repeats 7 --results_dir "$out" ;;
    cascade_speed_cifar)
        section "$name" 120 python3 -m benchmarks run cascade_speed --model_pair cifar --batch 256 --capacities pow2 \
            --repeats 5 --results_dir "$out" ;;
    step_speed_cifar)
        section "$name" 90 python3 -m benchmarks run step_speed --device gpu --model_pair cifar --steps 10 --repeats 3 \
            --skip_numerics --torch_tuned none --results_dir "$out" ;;
    esac
done

{
    echo "after:"
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
} >>"$out/env.txt" 2>&1
