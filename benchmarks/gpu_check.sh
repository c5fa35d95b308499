#!/usr/bin/env bash
# The efficiency table on a GPU (issue 19), ready for a lent device: LLaVA-1.5-7B's shape (CLIP ViT-L/14-336 +
# Llama 32 x 4096) with random weights -- nothing is downloaded -- in bf16 with sdpa (and flash-attention 2 when the
# machine already has it), batch 1 and 8, 576 visual + 64 text tokens: full, the ideal, RCP at the 192 / 128 / 64
# schedules (the authors' placements, fixed counts), VisPruner, FastV and random at the same visual tokens per
# layer; prefill, decode per token, 32-token end-to-end, peak memory, KV bytes (measured and analytic). Writes
# efficiency_llava-1.5-7b_gpu.{md,json,png} into OUT_DIR (after each batch size: a run stopped at its time limit keeps
# batch 1's). 280 s on one H200 with the GPU kernel times (2026-12-04, e4567bb; README, 'A third run'). Before the
# table it runs the CUDA-only tests, tests/test_cuda.py, into OUT_DIR/cuda_tests.txt (not fatal; 17-27 s there with
# four pytest-xdist workers, serial here and not yet timed on a GPU).
#
# The lent machine reaches no package registry, and its image holds an older transformers than this package needs
# (5.17 when last read; setup.cfg asks for 5.23.x). So the wheels it lacks are downloaded beforehand, on a machine
# that reaches the registries, into a folder that travels with the checkout (`.whl`, git-ignored; the device tool's
# `carry`); on the device they are installed into a scratch folder put on PYTHONPATH ahead of the image's packages.
# Nothing is installed from the network there, and this checkout is imported from its own root (no `pip install`).
#
#   bash benchmarks/gpu_check.sh --prepare [WHEEL_DIR]  # here: the wheels the device lacks (default .whl)
#   bash benchmarks/gpu_check.sh [--overwrite] [OUT_DIR]        # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu [--overwrite] [OUT_DIR]  # the same steps on the CPU, tiny shape, in seconds
#   bash benchmarks/gpu_check.sh --help                 # this text; does nothing else
#
# Relative WHEEL_DIR / OUT_DIR are read from the repository root (the script runs there). Default OUT_DIR: $OUT (the
# device tool's folder that comes back) or outputs/benchmarks. A table already in OUT_DIR
# (efficiency_llava-1.5-7b_gpu.*, its _flash twin or, with --cpu, efficiency_tiny_cpu.*), or a cuda_tests.txt, stops
# the script before anything is installed or timed, unless --overwrite.
#
# With the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540).
# Environment: PYTHON (default python3: the device's python3 holds its torch), RCP_WHEELS (default .whl),
# RCP_SITE (where the carried wheels go, default a fresh temporary folder), RCP_DEVICE_PYTHON (the device's Python
# version for --prepare, default 3.12).
set -euo pipefail
script="$0"

usage() {  # the comment block above, without its '#'
  sed -n '2,/^set -euo/p' "$script" | sed '$d' | sed 's/^# \{0,1\}//'
}

# --help anywhere, before anything else: it used to become OUT_DIR, and wheels were installed before a failure.
for arg in "$@"; do
  if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then usage; exit 0; fi
done
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
wheels="${RCP_WHEELS:-.whl}"

# The transformers requirement, read from setup.cfg's install_requires (one place says which versions work).
requirement() {
  "$py" - "$1" <<'EOF'
import configparser, re, sys
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
lines = [line.split("#")[0].strip() for line in cfg["options"]["install_requires"].splitlines()]
found = [line for line in lines if re.match(rf"{re.escape(sys.argv[1])}\s*[<>=!~]", line)]
if len(found) != 1:
    sys.exit(f"gpu_check: setup.cfg's install_requires names {sys.argv[1]} {len(found)} times, expected once")
print(found[0])
EOF
}

# The pip command that fetches wheels for the device (x86-64 Linux, CPython RCP_DEVICE_PYTHON), without their
# dependencies: the image has transformers' own requirements (tokenizers, huggingface_hub, safetensors, ...).
download=("$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${RCP_DEVICE_PYTHON:-3.12}"
          --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64)
hint="a missing or too old package can travel beside the others: ${download[*]} -d $wheels 'NAME==VERSION'"

if [[ "${1:-}" == "--prepare" ]]; then
  dest="${2:-$wheels}"
  if [[ "$dest" == -* ]]; then  # a flag after --prepare was taken as the folder ("mkdir: unrecognized option")
    echo "gpu_check: --prepare takes only a wheel folder, got '$dest'; see bash benchmarks/gpu_check.sh --help" >&2
    exit 2
  fi
  spec="$(requirement transformers)"
  mkdir -p "$dest"
  "${download[@]}" -d "$dest" "$spec"
  # pip installs no two versions of one package from one folder: refuse a folder that holds an older download.
  "$py" - "$dest" <<'EOF'
import collections, os, sys
names = collections.defaultdict(list)
for wheel in sorted(f for f in os.listdir(sys.argv[1]) if f.endswith(".whl")):
    names[wheel.split("-")[0].lower().replace("_", "-")].append(wheel)
twice = {name: files for name, files in names.items() if len(files) > 1}
if twice:
    sys.exit(f"gpu_check: {sys.argv[1]} holds several versions of {sorted(twice)}: {twice}; the device's pip would "
             "refuse them. Delete the old ones and run --prepare again.")
print("gpu_check: wheels to carry in", sys.argv[1] + ":", ", ".join(w for files in names.values() for w in files))
# What they need that is not carried: compare with the device image's versions (its KINDS.md) before a device start.
import zipfile
for files in names.values():
    with zipfile.ZipFile(os.path.join(sys.argv[1], files[0])) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        needs = [line.split(":", 1)[1].strip() for line in wheel.read(meta).decode().splitlines()
                 if line.startswith("Requires-Dist:") and "extra ==" not in line]
    print(f"gpu_check: {files[0]} requires: {', '.join(needs) or 'nothing'}")
EOF
  exit 0
fi

mode=gpu
overwrite=()
out=""
while (( $# )); do
  case "$1" in
    --cpu) mode=cpu ;;
    --overwrite) overwrite=(--overwrite) ;;
    -*) echo "gpu_check: unknown option $1; see bash benchmarks/gpu_check.sh --help" >&2; exit 2 ;;
    *) if [[ -n "$out" ]]; then
         echo "gpu_check: one OUT_DIR only, got '$out' and '$1'; see bash benchmarks/gpu_check.sh --help" >&2; exit 2
       fi
       out="$1" ;;
  esac
  shift
done
out="${out:-${OUT:-outputs/benchmarks}}"
# An earlier table in OUT_DIR is kept unless asked (every run passed --overwrite, so a rerun into the default folder
# replaced the last GPU table without a word): checked before any install or timing.
if [[ "$mode" == gpu ]]; then stems=(efficiency_llava-1.5-7b_gpu efficiency_llava-1.5-7b_gpu_flash)
else stems=(efficiency_tiny_cpu); fi
existing=()
for stem in "${stems[@]}"; do
  for ext in md json png; do
    if [[ -e "$out/$stem.$ext" ]]; then existing+=("$out/$stem.$ext"); fi
  done
done
if [[ -e "$out/cuda_tests.txt" ]]; then existing+=("$out/cuda_tests.txt"); fi
if (( ${#existing[@]} )) && (( ! ${#overwrite[@]} )); then
  cpu_flag=""
  if [[ "$mode" == cpu ]]; then cpu_flag=" --cpu"; fi
  echo "gpu_check: ${existing[*]} already exist: choose another OUT_DIR or pass --overwrite to replace them" \
       "(bash benchmarks/gpu_check.sh$cpu_flag --overwrite $out)." >&2
  exit 1
fi
mkdir -p "$out"
start=$(date +%s)

# The carried wheels, installed without a registry into a scratch folder put on PYTHONPATH, so before the image's
# site-packages (it shadows the image's own transformers; the image itself is left as it is).
shopt -s nullglob
carried=("$wheels"/*.whl)
shopt -u nullglob
if (( ${#carried[@]} )); then
  if [[ -n "${RCP_SITE:-}" ]]; then site="$RCP_SITE"; else site="$(mktemp -d)"; trap 'rm -rf "$site"' EXIT; fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${carried[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_check: installed the carried wheels into $site: ${carried[*]##*/}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's modules, imported from its root

# Refuse a transformers outside setup.cfg's range before any timing: the decoder loop relies on its internals.
spec="$(requirement transformers)"
"$py" - "$spec" "$hint" <<'EOF' || exit 1
import sys, traceback
from packaging.requirements import Requirement
try:
    import transformers
except Exception:  # e.g. its own dependency check found an older tokenizers / huggingface_hub in the image
    traceback.print_exc()
    sys.exit(f"gpu_check: transformers does not import here (above); {sys.argv[2]}")
req = Requirement(sys.argv[1])
if not req.specifier.contains(transformers.__version__, prereleases=True):
    sys.exit(f"gpu_check: this machine's transformers is {transformers.__version__} ({transformers.__file__}), but "
             f"this package needs {req} (setup.cfg). A lent device reaches no package registry: run `bash "
             "benchmarks/gpu_check.sh --prepare` on a machine that does, and carry the .whl folder with the "
             "checkout (device tool: carry=['.whl']).")
print(f"gpu_check: transformers {transformers.__version__} from {transformers.__file__}")
EOF
"$py" -c "import modeling_rcp_llava, rcp_llava.evaluation" || {
  echo "gpu_check: this checkout does not import here (above); $hint" >&2
  exit 1
}

# The CUDA-only tests first (tests/test_cuda.py: host syncs as PyTorch's CUDA sync debug mode reports them against the
# op counter, CPU/CUDA parity; they skip without CUDA), so that one lent call checks them too: their report goes to
# OUT_DIR/cuda_tests.txt, and a failure is said, not fatal (the table is still made).
if "$py" -c "import pytest" 2>/dev/null; then
  tests_rc=0
  # (at most 5 minutes: they compile Triton kernels, not yet timed on a GPU; 124 = stopped there)
  timeout 300 "$py" -m pytest -q -p no:cacheprovider -rfE tests/test_cuda.py > "$out/cuda_tests.txt" 2>&1 || tests_rc=$?
  echo "gpu_check: tests/test_cuda.py exit $tests_rc: $(tail -n 1 "$out/cuda_tests.txt") ($out/cuda_tests.txt)"
else
  echo "gpu_check: pytest is not installed here: tests/test_cuda.py not run"
fi

if [[ "$mode" == gpu ]]; then
  "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device (use --cpu)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  args=(--preset llava-1.5-7b --device cuda --batch_sizes 1,8 --repeats 3 --new_tokens 32)
  # flash-attention 2 only where the machine already has it: no registry to install it from, and a source build
  # would take far longer than this check may.
  flash=0
  if "$py" -c "import flash_attn" 2>/dev/null; then flash=1; fi
else
  # The GPU preset's 16 methods built on the meta device (configs, schedules, plug-ins): what can fail there before
  # a timing, checked without the device (a 455-wide pruner with 4 heads once would have failed 1 minute in).
  "$py" benchmarks/efficiency.py --preset llava-1.5-7b --dry_run
  args=(--preset tiny --device cpu --batch_sizes 1,2 --repeats 1 --new_tokens 4 --budgets 64)
  flash=0
fi

"$py" benchmarks/efficiency.py "${args[@]}" --output_dir "$out" ${overwrite[@]+"${overwrite[@]}"}
if [[ "$flash" == 1 ]]; then
  "$py" benchmarks/efficiency.py "${args[@]}" --output_dir "$out" ${overwrite[@]+"${overwrite[@]}"} \
    --attn_implementation flash_attention_2 --methods full,rcp,ideal --tag flash
else
  echo "gpu_check: flash-attention 2 not run (flash_attn is not installed here, or CPU mode)"
fi
echo "gpu_check: done in $(( $(date +%s) - start )) s; tables in $out"
