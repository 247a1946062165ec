#!/usr/bin/env bash
# The GPU check for a short GPU loan (one H100/H200, 16 cores, Python 3.12 with torch,
# torchvision and h5py, no package index): at most 8 minutes, from the repository root.
#
#   python scripts/gpu_bundle.py                     # here, before the loan (make gpu-bundle)
#   scripts/gpu_check.sh [OUT_DIR] [BUNDLE_DIR]      # there; OUT_DIR defaults to $OUT
#   scripts/gpu_check.sh --cpu OUT_DIR               # the same steps, tiny, on the CPU
#
# Installs the bundle (default .gpu_bundle/py3.12) into a temporary folder, then runs: the
# GPU-marked tests, a short `simulation=gpu` run with overlapped evaluation, the data-path
# benchmark (train and eval modes, CUDA) and 3 rounds (after 1 warm-up) of the FLAIR
# benchmark setting (resnet18, 224 px, cohort 200) in bf16 and fp32 beside the pure-PyTorch
# reference, and between those two whether the driver's evaluation starves clients that
# share the GPU (bench_data.py --mode contention). Each step has its own time limit (a hang costs that step only) and the whole
# check a deadline; a failed step is reported and the next one runs. OUT_DIR gets
# steps.jsonl (one line per step: rc, seconds, limit), logs/STEP.log and the benchmarks'
# JSON and markdown. Exit status: the number of failed steps (0: all passed).
set -u
CPU=0
if [ "${1:-}" = "--cpu" ]; then CPU=1; shift; fi
OUT_DIR=${1:-${OUT:?usage: scripts/gpu_check.sh [--cpu] OUT_DIR [BUNDLE_DIR]}}
BUNDLE=${2:-.gpu_bundle/py3.12}
PY=${GPU_CHECK_PYTHON:-python3}
DEADLINE=$(($(date +%s) + ${GPU_CHECK_SECONDS:-470}))
mkdir -p "$OUT_DIR/logs"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d)
SITE="$WORK/site"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
export FLWR_TELEMETRY_ENABLED=0 WANDB_MODE=offline RAY_USAGE_STATS_ENABLED=0
FAILED=()

step() { # step NAME SECONDS COMMAND...: run under min(SECONDS, time left), log, record
  local name=$1 limit=$2 start rc left
  shift 2
  limit=$((limit * SCALE))
  left=$((DEADLINE - $(date +%s)))
  ((left < limit)) && limit=$left
  start=$(date +%s)
  if ((limit < 5)); then
    rc=124
    echo "check deadline reached before $name" >"$OUT_DIR/logs/$name.log"
  else
    echo "+ $*" >"$OUT_DIR/logs/$name.log"
    timeout --kill-after=10 "$limit" "$@" >>"$OUT_DIR/logs/$name.log" 2>&1
    rc=$?
  fi
  printf '{"step": "%s", "rc": %d, "seconds": %d, "limit": %d}\n' \
    "$name" "$rc" $(($(date +%s) - start)) "$limit" >>"$OUT_DIR/steps.jsonl"
  if ((rc != 0)); then
    FAILED+=("$name")
    echo "gpu_check: step $name FAILED (rc $rc$( ((rc == 124)) && echo ', timed out'));" \
      "last lines of logs/$name.log:" >&2
    tail -n 15 "$OUT_DIR/logs/$name.log" >&2
  else
    echo "gpu_check: step $name ok ($(($(date +%s) - start)) s)" >&2
  fi
}

GPU_TESTS=(tests/test_augment.py tests/test_compact.py tests/test_eval_path.py tests/test_train_path.py)
NO_PLOTS="~logger.plots" # matplotlib does not travel in the bundle
SCALE=1
if ((CPU)); then
  SCALE=4 # a small shared CPU starts Ray and runs the reference far slower than the GPU node
  SIM=(simulation=cpu num_rounds=2)
  DATA=(--devices cpu --users 12 --repeats 1 --image-size 32 --input-size 24)
  FLAIR=(--device cpu --model smallcnn --image-size 16 --cohort 3 --epochs 1 --batch-size 4
    --num-cpus 1 --num-gpus 0 --users 20 --rounds 1 --warmup 0 --reference-threads 1)
  PRECISIONS=(fp32)
  CONTENTION=(--devices cpu --clients 1 --users 12 --image-size 32 --input-size 24
    --models smallcnn --phase-s 1.5)
else
  SIM=(simulation=gpu num_rounds=3)
  DATA=(--devices cuda --users 400 --repeats 3)
  FLAIR=(--device cuda --model resnet18 --image-size 224 --cohort 200 --epochs 2
    --batch-size 16 --num-cpus 2 --num-gpus 0.125 --users 400 --rounds 3 --warmup 1
    --reference-threads 2)
  PRECISIONS=(bf16 fp32)
  # Eight clients (num_gpus 0.125) training resnet18 in bf16 while the driver evaluates.
  CONTENTION=(--devices cuda --clients 8 --users 400 --models resnet18 --precision bf16
    --phase-s 6)
fi

step machine 20 bash -c "nvidia-smi || true; $PY --version; nproc; free -g; uptime"
if ((CPU == 0)) || [ -d "$BUNDLE" ]; then
  step install 60 bash -c "$PY -m pip install --quiet --no-index --no-deps --target '$SITE' '$BUNDLE'/*.whl"
fi
step gpu-tests 60 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}"
step simulation 60 "$PY" -m flair_fl.run debug=tiny "${SIM[@]}" eval.overlap=true "$NO_PLOTS" \
  "hydra.run.dir=$OUT_DIR/simulation" "data.cache_dir=$WORK/data"
step data-path 75 "$PY" scripts/bench_data.py --mode all --name data-path --out "$OUT_DIR" \
  --cache-dir "$WORK/data" "${DATA[@]}"
flair() { # flair PRECISION: the FLAIR benchmark setting beside the pure-PyTorch reference
  step "flair-$1" 110 "$PY" scripts/bench.py "$NO_PLOTS" --name "flair-$1" --out "$OUT_DIR" \
    --cache-dir "$WORK/data" --transport shared --precision "$1" "${FLAIR[@]}"
}
flair "${PRECISIONS[0]}"
step contention 60 "$PY" scripts/bench_data.py --mode contention --name contention \
  --out "$OUT_DIR" --cache-dir "$WORK/data" "${CONTENTION[@]}"
for precision in "${PRECISIONS[@]:1}"; do
  flair "$precision"
done

rm -rf "$WORK"
if ((${#FAILED[@]})); then
  echo "gpu_check: ${#FAILED[@]} step(s) failed: ${FAILED[*]} (see $OUT_DIR/steps.jsonl)" >&2
else
  echo "gpu_check: all steps passed; results in $OUT_DIR" >&2
fi
exit "${#FAILED[@]}"
