#!/usr/bin/env bash
# GPU check of the fused Triton kernels (kale_ext/embed/conv_triton.py), as one prepared run on a CUDA machine.
# The first lines name the card (nvidia-smi), torch and triton; then:
#   0. the self-check that guards conv_impl "auto" (kale_ext/embed/kernel_check.py): its verdict on this card,
#   1. the kernel tests with the real Triton compiler (tests/embed/test_conv_triton.py, test_kernel_check.py),
#   2. benchmarks/triton_kernels.py (paper size: fused kernels vs the torch paths, fp32 and bf16, batch 256/1024),
#   3. benchmarks/pretrain_throughput.py with its default flags (synthetic tensors on the GPU),
#   4. benchmarks/pretrain_throughput.py --end-to-end: the pipeline step from a float16 cache, loader included.
# Needs no network: torch (with triton) preinstalled; pytest and pykale are used when present.
# Logs go to $OUT (or ./gpu_check_out): env.log, self_check.log, tests.log, triton_kernels.log,
# pretrain_throughput.log, end_to_end.log and summary.txt (one line per stage with its exit status and seconds).
# Exit status 1 if any stage failed. Each stage has a time limit (seconds: CHECK_TIMEOUT, TESTS_TIMEOUT,
# BENCH_TIMEOUT, PRETRAIN_TIMEOUT, E2E_TIMEOUT; 60 + 120 + 95 + 75 + 150, plus at most 5 s each to stop) so the
# whole script ends within about 9 minutes; BENCH_ARGS, PRETRAIN_ARGS and E2E_ARGS add flags to stages 2-4 (e.g.
# PRETRAIN_ARGS="--window 2500 --variants loop,lsemvae:blockdiag,lsemvae:triton" for records and windows).
#
# Usage, from anywhere:  bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.." || exit 2
out_dir="${OUT:-gpu_check_out}"
mkdir -p "$out_dir"
py="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
unset TRITON_INTERPRET  # the real compiler
status=0
: >"$out_dir/summary.txt"

stage() {
    local name=$1 limit=$2
    shift 2
    local start rc
    start=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" | tee -a "$out_dir/summary.txt"
    timeout --kill-after=5 "$limit" "$@" >"$out_dir/$name.log" 2>&1
    rc=$?
    tail -n 60 "$out_dir/$name.log"
    echo "=== $name: rc=$rc in $(($(date +%s) - start)) s" | tee -a "$out_dir/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

# The card, torch and triton first, on one line each (what every figure below was measured on).
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
{
    echo "card: ${card:-unknown (nvidia-smi not found)}"
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tail -n 1
    "$py" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -n 1
} | tee -a "$out_dir/summary.txt"
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi not found"
    "$py" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, 'available', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    "$py" -c "import triton; print('triton', triton.__version__)" 2>&1
    "$py" -c "import pytest; print('pytest', pytest.__version__)" 2>&1
    "$py" -c "import kale; print('pykale present')" 2>&1 | tail -n 1
} >"$out_dir/env.log" 2>&1
cat "$out_dir/env.log"

# The verdict conv_impl "auto" acts on: the fused kernels against float64 torch (fp32 IEEE and bf16 autocast,
# forward and every gradient), run afresh here (no cached verdict), then through the cached path auto uses.
self_check_py="$(mktemp "${TMPDIR:-/tmp}/kale_self_check.XXXXXX")"
cat >"$self_check_py" <<'PY'
import torch
from kale_ext.embed import kernel_check as kc
from kale_ext.embed.conv_ops import resolve_conv_impl
dev = torch.device("cuda")
v = kc.check_triton_kernels(dev)
print("self-check verdict:", "PASS" if v.ok else "FAIL", v.reason)
print("key:", v.key)
for dt in ("float32", "bfloat16"):
    errs = {k: e for k, e in v.errors.items() if f" {dt} " in k}
    if errs:
        worst = max(errs, key=errs.get)
        tol = kc.TOLERANCES[getattr(torch, dt)]
        print(f"{dt}: {len(errs)} tensors compared, worst {worst} = {errs[worst]:.3g} (tolerance {tol:g})")
print("auto resolves to:", resolve_conv_impl("auto", dev), "; verdict file:", kc.cache_dir() / kc.CACHE_FILE)
raise SystemExit(0 if v.ok else 1)
PY
stage self_check "${CHECK_TIMEOUT:-60}" "$py" "$self_check_py"
rm -f "$self_check_py"
grep -h "self-check verdict" "$out_dir/self_check.log" >>"$out_dir/summary.txt" 2>/dev/null

if "$py" -c "import pytest" 2>/dev/null; then
    stage tests "${TESTS_TIMEOUT:-120}" "$py" -m pytest -q -x -p no:cacheprovider tests/embed/test_conv_triton.py \
        tests/embed/test_kernel_check.py
else
    echo "=== tests: skipped, pytest is not installed" | tee -a "$out_dir/summary.txt"
fi
# shellcheck disable=SC2086  # word splitting of the extra flags is intended
stage triton_kernels "${BENCH_TIMEOUT:-95}" "$py" benchmarks/triton_kernels.py ${BENCH_ARGS:-}
# shellcheck disable=SC2086
stage pretrain_throughput "${PRETRAIN_TIMEOUT:-75}" "$py" benchmarks/pretrain_throughput.py ${PRETRAIN_ARGS:-}
# The acceptance figure: the pipeline's step end to end from a float16 cache at paper size (12 x 5000, D 256,
# batch 1024, bf16), against the per-lead loop in the same run, eager and compiled.
stage end_to_end "${E2E_TIMEOUT:-150}" "$py" benchmarks/pretrain_throughput.py --end-to-end "${E2E_CACHE:-/tmp/kale_e2e_cache}" \
    --make-cache "${E2E_RECORDS:-16384}" --variants "${E2E_VARIANTS:-loop,lsemvae:blockdiag,lsemvae:triton}" \
    --count-flops ${E2E_ARGS:-}

cat "$out_dir/summary.txt"
exit "$status"
