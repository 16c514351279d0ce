#!/usr/bin/env bash
# The GPU benchmark run, prepared to finish in about 7 minutes on one H200-class GPU.
#
#   bash benchmarks/gpu_run.sh [OUTDIR]          run everything (OUTDIR default: $OUT, else gpu-results/)
#   bash benchmarks/gpu_run.sh --install DIR     install the wheels in DIR into .site/ (no index needed)
#
# What it collects (each part in its own process with its own time limit, so one failure keeps the
# others; every result merged into OUTDIR/results.json, logs in OUTDIR/run.log):
#   1. env          nvidia-smi, torch/CUDA and package versions                          (~10 s)
#   2. nf4          tiny fixtures loaded in NF4 and bf16 on CUDA through load_eventgpt:
#                   placement + teacher-forced rows agree                                 (~60 s)
#   3. extraction   EventGPT-7b + Video-LLaVA-7B (real configs, random bf16 weights built on the
#      + lora       GPU): shared_prefix extraction pairs/s at batch 1 and 16 (8 frames, 50 tokens),
#                   outside-forward share, target TF vs AR; then the drafter saved and reloaded in
#                   NF4 (bitsandbytes CUDA) for one L6 epoch: seconds per optimizer step   (~4-5 min)
#   4. adapter      L4 adapter training pairs/s at D=4096                                 (~1 min)
#   5. sd           `python -m benchmarks --only sd --device cuda` once a stage-5 benchmark module
#                   (benchmarks/bench_*sd*.py or bench_*specul*.py) exists; skipped before (bf16)
#
# On a bare GPU node (no package index) carry the missing wheels: here run
# `bash benchmarks/gpu_wheels.sh`, then two device calls back to back (the machine stays warm ~30 s):
#   run(command="bash benchmarks/gpu_run.sh --install .whl-a", carry=[".whl-a"], timeout_s=180)
#   run(command="bash benchmarks/gpu_run.sh --install .whl-b && GPU_RUN_PARTS='nf4 extraction_lora adapter'
#       bash benchmarks/gpu_run.sh", carry=[".whl-b"], timeout_s=600)
# (.site/ stays on the warm machine between the calls; results come back in $OUT).
#
# GPU_RUN_DEVICE=cpu GPU_RUN_SHAPE=tiny bash benchmarks/gpu_run.sh DIR runs the same script on CPU at the
# tiny shape (what the slow test in tests/benchmarks does), to catch mistakes before device time is spent.
# GPU_RUN_PARTS="nf4 extraction_lora adapter" (default: those and sd) picks parts: the first three fit one
# 600 s device call (limits 90 + 330 + 120 s); once the stage-5 benchmark exists give sd its own call.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${GPU_RUN_DEVICE:-cuda}
SHAPE=${GPU_RUN_SHAPE:-7b}
RUN_PARTS=${GPU_RUN_PARTS:-nf4 extraction_lora adapter sd}

if [ "${1:-}" = "--install" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site "${2:?wheel dir}"/*.whl
  exit $?
fi

OUTDIR=${1:-${OUT:-gpu-results}}
mkdir -p "$OUTDIR"
PARTS=$(mktemp -d)
LOG="$OUTDIR/run.log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .site ] && export PYTHONPATH="$PWD/.site:$PYTHONPATH"

{ date; nvidia-smi 2>&1 | head -15; "$PY" - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("transformers", "peft", "bitsandbytes", "av", "pydantic", "pyarrow", "safetensors", "fsspec",
             "accelerate", "tokenizers", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # report, the parts below fail with their own message
        print(name, "MISSING", type(exc).__name__, exc)
EOF
} > "$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" > "$PARTS/$name.json" 2>> "$LOG"
  local rc=$?
  echo "=== $name exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  tail -c 2000 "$PARTS/$name.json"
}

SHAPES=("$PY" -m benchmarks.bench_shapes --device "$DEVICE" --shape "$SHAPE")
wanted() { [[ " $RUN_PARTS " == *" $1 "* ]]; }
wanted nf4 && part nf4 90 "${SHAPES[@]}" --parts nf4
wanted extraction_lora && part extraction_lora 330 "${SHAPES[@]}" --parts extraction,lora
wanted adapter && part adapter 120 "${SHAPES[@]}" --parts adapter
if wanted sd; then
  if compgen -G "benchmarks/bench_*sd*.py" > /dev/null || compgen -G "benchmarks/bench_*specul*.py" > /dev/null; then
    part sd 240 "$PY" -m benchmarks --only sd --only specul --device "$DEVICE" --json
  else
    echo "=== sd skipped: no stage-5 benchmark module (benchmarks/bench_*sd*.py) yet" | tee -a "$LOG"
  fi
fi

"$PY" - "$PARTS" "$OUTDIR/results.json" <<'EOF'
import json, pathlib, sys
merged, problems = {}, {}
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        merged.update(json.loads(p.read_text() or "{}"))
    except ValueError as exc:
        problems[p.stem] = f"no JSON result ({exc}); see run.log"
if problems:
    merged["_failed_parts"] = problems
pathlib.Path(sys.argv[2]).write_text(json.dumps(merged, indent=2))
print(json.dumps({k: v.get("ratio") if isinstance(v, dict) else v for k, v in merged.items()}, indent=2))
EOF
rm -rf "$PARTS"
