#!/usr/bin/env bash
# One GPU lease, few calls: the kernels (NsLN, attention, Sinkhorn) verified and measured on a GPU, and the
# throughput profile of the training step.
#
#   bash benchmarks/gpu_session.sh tests        # build lct_fast._C, GPU tests + the kernel test files
#   bash benchmarks/gpu_session.sh nsln attention ot   # one or more benchmarks (bench_<name>.py)
#   bash benchmarks/gpu_session.sh tests nsln    # stages run in the order given
#   bash benchmarks/gpu_session.sh profile       # launch/profile.py: reference vs fused kernels, DiT-B..XXL sweep
#   GPU_SECONDS=560 bash benchmarks/gpu_session.sh tests attention nsln ot profile-kernels   # one lease
#
# Prerequisites here (no GPU needed): `bash ../shared/device/wheels.sh` fills .whl/ (deepspeed, POT,
# webdataset, ...): carry `.whl` in the device call; without it the suite cannot even be collected.
# Everything comes back as one file, $OUT/session.tar.gz (./gpu-out when OUT is unset; a call returns at
# most 8 files of 16 MiB, and one that hits its time limit keeps only what is already under $OUT): one log
# per stage and the results written during the session, packed again after every stage. The POT wheel
# carries a 175 MB module (ot.bsp) that nothing here uses: strip it to fit the 64 MiB a call carries (see
# benchmarks/results/gpu-h200-20261204.md). The tests run with LCT_FAST_AUTOTUNE=0: one launch configuration per
# kernel specialisation instead of compiling and timing every candidate (hundreds of compiles, most of a
# call); every candidate's compile is checked on CPU by tests/test_triton_aot.py. Benchmarks autotune.
# GPU_SECONDS bounds the whole session: every stage runs under `timeout` with what is left of it (each
# stage also has its own cap), so a lease's call returns before its limit with every finished stage's
# logs (unpack session.tar.gz in the checkout: logs/ and benchmarks/results/).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
final=${OUT:-$root/gpu-out}
# the logs live outside $OUT: a lease's call brings back at most 8 files, and the one that matters is the
# packed session (logs and new results together)
work=$(mktemp -d)
out=$work/logs
mkdir -p "$out" "$final"
export PYTHONUNBUFFERED=1
t_end=$(( $(date +%s) + ${GPU_SECONDS:-100000} ))
left() {  # seconds left for a stage: the smaller of its cap ($1) and the session's rest, less 10 s to pack
  local rest=$(( t_end - $(date +%s) - 10 ))
  [ "$rest" -lt 1 ] && rest=1
  [ "$rest" -lt "$1" ] && echo "$rest" || echo "$1"
}
stamp=$(mktemp)  # results written after this are the session's own: only those travel back
pack() {  # one file: the logs (no traces) and this session's new results, not the committed ones
  local new=()
  mapfile -t new < <(find benchmarks/results -type f -newer "$stamp")
  local args=(-C "$work" logs)
  [ ${#new[@]} -gt 0 ] && args+=(-C "$root" "${new[@]}")
  tar czf "$final/session.tar.gz" --exclude='*trace*' "${args[@]}" || echo "gpu_session: packing failed"
}

ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_session: no .whl/ — run bash ../shared/device/wheels.sh here and carry .whl"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_session: installing .whl failed"; exit 2; }
export PYTHONPATH=/tmp/site:$root${PYTHONPATH:+:$PYTHONPATH}

{
  date -u +"date %Y-%m-%dT%H:%MZ"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

build() {
  # the CUDA extension (csrc/) against the machine's CUDA torch; the .so lands in lct_fast/ (in-place build)
  MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout "$(left 300)" python3 setup.py build_ext --inplace > "$out/build.log" 2>&1
  tail -3 "$out/build.log"
  python3 -c "import lct_fast._C; print('lct_fast._C built')" || echo "gpu_session: lct_fast._C did not build"
}

run_tests() {
  build
  export LCT_FAST_AUTOTUNE=0
  timeout "$(left 200)" python3 -m pytest -q -rs -m gpu --durations=15 tests 2>&1 | tee "$out/gpu_tests.log"
  pack
  # the same kernel files' non-gpu tests (they take CUDA too when it is present); -m gpu ran above
  timeout "$(left 120)" python3 -m pytest -q -rs -m "not gpu" --durations=10 tests/test_nsln_kernels.py tests/test_flash_attention.py \
    tests/test_ops_nsln.py tests/test_ops_attention.py tests/test_ot_kernels.py tests/test_ot_cuda.py \
    tests/test_models_jvp.py 2>&1 | tee "$out/kernel_tests.log"
  unset LCT_FAST_AUTOTUNE
}

run_bench() {  # $1: nsln | attention | ot
  ls lct_fast/_C*.so >/dev/null 2>&1 || build
  local extra=()
  [ "$1" = ot ] && extra=(--global --step-config configs/b.json)
  [ "$1" = nsln ] && extra=(--quick)
  timeout "$(left 120)" python3 "benchmarks/bench_$1.py" "${extra[@]}" 2>&1 | tee "$out/bench_$1.log"
}

run_profile() {  # $1: kernels | plan | sweep | all
  # The trainer's own step on one GPU (embedded data shaped like the model, 64x64x4 latents). Each sweep
  # point is a fresh process; an OOM is a row of the table. kernels: reference vs fused (2 points); plan:
  # eager with the JVP in fp32 (the presets' default) against compiled blocks with the JVP in bf16 and the
  # two mixed points (4); sweep: DiT-B..XXL at ZeRO 1 and 3 (8).
  ls lct_fast/_C*.so >/dev/null 2>&1 || build
  local tag day common parts sweep
  tag=$(python3 -c "from benchmarks.harness import machine_tag; print(machine_tag())")
  day=$(date -u +%Y%m%d)
  common=(--synthetic-data --set train.global_batch=32 --steps "${PROFILE_STEPS:-5}" --warmup 2 --point-timeout 240)
  parts=("$1"); [ "$1" = all ] && parts=(kernels plan sweep)
  for d in "${parts[@]}"; do
    case "$d" in
      kernels) sweep=(--set train.micro_batch=32 --sweep kernels=reference,fused) ;;
      plan) sweep=(--set train.micro_batch=32 --sweep train.compile=false,true method.sct.jvp_dtype=fp32,bf16) ;;
      # shellcheck disable=SC2206
      sweep) sweep=(--sweep ${PROFILE_SWEEP:-size=b,l,xl,xxl zero=1,3 micro_batch=32}) ;;
    esac
    timeout "$(left 600)" python3 launch/profile.py --config configs/b.json "${common[@]}" "${sweep[@]}" \
      --out "$out/profile-$d" 2>&1 | tee "$out/profile_$d.log"
    for ext in md csv png; do
      [ -f "$out/profile-$d/sweep.$ext" ] && cp "$out/profile-$d/sweep.$ext" "benchmarks/results/profile-$d-$tag-$day.$ext"
    done
    pack
  done
}

[ $# -gt 0 ] || { echo "usage: $0 tests|nsln|attention|ot|profile|profile-{kernels,plan,sweep} ..."; exit 2; }
for stage in "$@"; do
  [ "$(left 100000)" -gt 20 ] || { echo "gpu_session: GPU_SECONDS spent, skipping $stage"; continue; }
  case "$stage" in
    tests) run_tests ;;
    nsln|attention|ot) run_bench "$stage" ;;
    profile) run_profile all ;;
    profile-kernels|profile-plan|profile-sweep) run_profile "${stage#profile-}" ;;
    *) echo "gpu_session: unknown stage $stage (tests|nsln|attention|ot|profile|profile-kernels|-plan|-sweep)"; exit 2 ;;
  esac
  pack
done
