#!/usr/bin/env bash
# The project's check on one CUDA GPU, in about 8 minutes: the gpu-marked tests (sdpa flash and
# xformers against math in bf16), the attention core's fused backend vs math (time, memory), the CLIP step and the diffusion decoder against their
# reference libraries in bf16, a 200-step gpu1.yaml fit on synthetic shards, and one step each
# of DDP and BlockFSDP. Prints one table at the end; every command's log is kept in --out.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: benchmarks/gpu_check.sh [--out DIR] [--fit-steps N] [--dry-run] [-h|--help]

Runs on one CUDA GPU, from the repository root, after `pip install -e ".[dev]"`:
  1. pytest -m gpu                          the GPU tests (sdpa / xformers against math, bf16)
  2. benchmarks/attention.py --device cuda  fused attention (sdpa) vs math: time, peak memory
  3. benchmarks/clip_step.py                our CLIP step vs open_clip, bf16-mixed
  4. benchmarks/diffusion.py (unet, mmdit)  our decoder vs bare diffusers, bf16-mixed
  5. multimodal fit gpu1.yaml               N steps (default 200) on synthetic shape shards
  6. multimodal fit gpu1.yaml x 1 step      with --trainer.strategy ddp, then BlockFSDP
and prints one table (check, status, seconds, headline figure).

options:
  --out DIR        where logs, shards and runs go (default: a new folder under /tmp)
  --fit-steps N    steps of the gpu1.yaml fit (default: 200)
  --dry-run        print the commands without running them (works without a GPU; writes nothing)

Environment: PYTHON (default: python) is the interpreter it runs. Exit status: 0 all checks
passed, 1 a check failed, 2 bad options, 3 no CUDA device (or torch not importable).
  -h, --help       show this help and exit
EOF
}

OUT="" FIT_STEPS=200 DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) [ $# -ge 2 ] || { echo "--out needs a folder" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --fit-steps) [[ "${2:-}" =~ ^[1-9][0-9]{0,5}$ ]] || { echo "--fit-steps must be an integer from 1 to 999999, got '${2:-}'" >&2; exit 2; }
                 FIT_STEPS="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
if [ -z "$OUT" ]; then
  OUT="/tmp/gpu_check.XXXXXX"; AUTO=1  # made (mktemp) once the GPU is found
fi
if [ -e "$OUT" ] && { [ ! -d "$OUT" ] || [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; }; then
  echo "--out $OUT exists and is not an empty folder: give a new folder" >&2; exit 2
fi
if [ "$DRY" = 0 ]; then
  if ! probe="$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>&1)"; then
    echo "cannot import torch with PYTHON=$PY" >&2; exit 3
  fi
  if [ "$probe" != 1 ]; then
    echo "no CUDA device visible to torch: this check needs one GPU (use --dry-run to see the commands)" >&2; exit 3
  fi
fi
if [ "${AUTO:-0}" = 1 ] && [ "$DRY" = 0 ]; then OUT="$(mktemp -d /tmp/gpu_check.XXXXXX)"; fi
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # absolute: the commands run inside it
[ "$DRY" = 1 ] || mkdir -p "$OUT"
SHARDS="$OUT/shards"
GPU1="$ROOT/assets/configs/gpu1.yaml"
# the gpu1 recipe, small enough for a few minutes: no gradient accumulation, batch 64, short validation
FIT=(-m multimodal.cli fit --config "$GPU1" --data.path "$SHARDS/train-{00000..00003}.tar" --data.val_path "$SHARDS/val-00000.tar"
     --data.batch_size 64 --data.val_batch_size 64 --data.num_workers 4 --data.val_size 256 --data.epoch_size 4096
     --trainer.accumulate_grad_batches 1 --trainer.limit_val_batches 2)
OVERRIDES='{decoder: {image_size: 64, block_out_channels: [128, 256, 512], down_block_types: [DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D], up_block_types: [CrossAttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D], layers_per_block: 2, attention_head_dim: 64, ema_decay: 0}}'

NAMES=() STATUS=() SECS=() FIGS=()
run() {  # run NAME FIGURE_PATTERN COMMAND...: time it, keep its log, note its headline line
  local name="$1" pattern="$2"; shift 2
  local log="$OUT/${name// /_}.log"
  if [ "$DRY" = 1 ]; then printf '(cd %q && ' "$OUT"; printf '%q ' "$@"; echo ')'; return; fi
  echo "== $name ($log)"
  local start=$SECONDS
  ( cd "$OUT" && "$@" ) >"$log" 2>&1
  local rc=$?
  NAMES+=("$name"); SECS+=("$((SECONDS - start))")
  if [ $rc = 0 ]; then STATUS+=("ok"); else STATUS+=("FAILED ($rc)"); fi
  FIGS+=("$(grep -E "$pattern" "$log" | tail -n 2 | tr -s ' ' | tr '|' '/' | tr '\n' ';' | cut -c1-240)")
}

run "gpu tests" "passed|failed|skipped" "$PY" -m pytest -q -m gpu "$ROOT/tests"
run "attention bf16" "^ *[0-9]+ " "$PY" "$ROOT/benchmarks/attention.py" --device cuda --dtype bfloat16
run "clip step bf16" "ratio" "$PY" "$ROOT/benchmarks/clip_step.py" --device cuda --preset base --batch 64 --precision bf16-mixed --rounds 3
run "diffusion unet bf16" "ratio" "$PY" "$ROOT/benchmarks/diffusion.py" --device cuda --precision bf16-mixed --bf16-batch 64 --rounds 4
run "diffusion mmdit bf16" "ratio" "$PY" "$ROOT/benchmarks/diffusion.py" --device cuda --backbone mmdit --precision bf16-mixed --bf16-batch 64 --rounds 4
run "synthetic shards" "wrote" "$PY" "$ROOT/benchmarks/shapes_shards.py" "$SHARDS" --shards 4 --per-shard 1024
run "gpu1 fit ${FIT_STEPS} steps" "it/s|s/it|samples|val/" "$PY" "${FIT[@]}" --trainer.max_steps "$FIT_STEPS" --trainer.val_check_interval "$FIT_STEPS"
run "ddp 1 step" "Epoch|error" "$PY" "${FIT[@]}" --trainer.max_steps 1 --trainer.strategy ddp --trainer.limit_val_batches 0 \
    --trainer.logger.init_args.name gpu1_ddp
# (no gradient clipping: Lightning's FSDP precision plugin refuses clip-by-norm)
run "fsdp 1 step" "Epoch|error" "$PY" "${FIT[@]}" --trainer.max_steps 1 --trainer.strategy train.strategies.BlockFSDP \
    --trainer.gradient_clip_val 0 --trainer.limit_val_batches 0 --trainer.logger.init_args.name gpu1_fsdp --model.overrides "$OVERRIDES"

[ "$DRY" = 1 ] && exit 0
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
printf '\n| %-22s | %-10s | %5s | %s\n|%s|\n' "check" "status" "s" "headline (last lines of its log)" "---|---|---|---"
failed=0
for i in "${!NAMES[@]}"; do
  printf '| %-22s | %-10s | %5s | %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${FIGS[$i]}"
  [ "${STATUS[$i]}" = ok ] || failed=1
done
echo "logs: $OUT"
exit $failed
