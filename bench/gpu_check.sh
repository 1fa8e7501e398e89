#!/usr/bin/env bash
# gpu_check: grpo_train.py --fsdp --bf16 --gradient-checkpointing on ONE GPU (torchrun, 1 process) with a random
# Qwen2.5-VL of Qwen2.5-VL-7B's widths but 4 text layers and 4 vision blocks (2.1 B parameters, so that the full
# fine-tune fits), KonIQ-sized 1024 x 768 images, G = 8, 4 pairs per step, 256-token completions (a random model never
# stops early), 3 steps; the reference and policy passes forward each prompt once with its G completions packed
# behind it (logprobs.shared_prompt). Prints the step time split, generated tokens/s and peak GPU memory beside
# bench/memory_plan.py's prediction for the same model and settings. Then voting: sample_votes.py on 8 pairs of
# 1024 x 768 images, K = 32 votes each (256 sequences in one call), answers of uneven length (uniform on 1..512 tokens)
# with the shared-prefix engine and with each prompt's KV copied per vote: generated tokens/s, KV bytes and peak
# memory of both; then the two decode paths' tokens and logits side by side in bf16 on the GPU. About 5-7 minutes, at
# most 10, on one H100/H200.
#
#   bash bench/gpu_check.sh [WORK]             # WORK (default /tmp/gpu_check) holds the model, images and the run
#   bash bench/gpu_check.sh --dry-run [WORK]   # CPU, seconds: builder (no weights), inputs and the plan only
#
# Settings from the environment: TEXT_LAYERS (4), VISION_DEPTH (4), STEPS (3), NEW_TOKENS (256), GRPO_TRAIN
# (grpo_train.py), TIME_LIMIT (330 s for the training run), VOTES (32), VOTE_PAIRS (8), VOTE_TOKENS (512), VOTE_LIMIT
# (90 s per engine). With $OUT set, the small outputs (report, plan, logs)
# are copied to $OUT/gpu_check at exit, also after a failure; the weights never are.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
WORK=${1:-/tmp/gpu_check}
GRPO_TRAIN=${GRPO_TRAIN:-grpo_train.py}
TEXT_LAYERS=${TEXT_LAYERS:-4}; VISION_DEPTH=${VISION_DEPTH:-4}; STEPS=${STEPS:-3}; NEW_TOKENS=${NEW_TOKENS:-256}
TIME_LIMIT=${TIME_LIMIT:-330}
VOTES=${VOTES:-32}; VOTE_PAIRS=${VOTE_PAIRS:-8}; VOTE_TOKENS=${VOTE_TOKENS:-512}; VOTE_LIMIT=${VOTE_LIMIT:-90}
G=8; PAIRS=4; MICRO=4
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
die() { echo "gpu_check: error: $*" >&2; exit 2; }

# 1. The flags this check runs with must exist (--fsdp comes from the FSDP2 branch of grpo_train.py).
HELP=$(python "$GRPO_TRAIN" --help 2>&1) || die "python $GRPO_TRAIN --help failed: $HELP"
for flag in --fsdp --bf16 --gradient-checkpointing; do
  if ! grep -qE -- "$flag([^-a-z]|\$)" <<<"$HELP"; then
    if [[ $DRY == 1 ]]; then echo "gpu_check: warning: $GRPO_TRAIN has no $flag flag (a real run would stop here)"
    else die "$GRPO_TRAIN has no $flag flag: this check needs grpo_train.py's FSDP2 path (--fsdp, --bf16, --gradient-checkpointing); merge it first"
    fi
  fi
done
VOTE_HELP=$(python sample_votes.py --help 2>&1) || die "python sample_votes.py --help failed: $VOTE_HELP"
for flag in --votes-per-pair --num-pairs --max-new-tokens --reasoning --batch-size; do
  grep -qE -- "$flag([^-a-z]|\$)" <<<"$VOTE_HELP" || die "sample_votes.py has no $flag flag"
done
if [[ $DRY == 0 ]]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || die "no CUDA GPU visible (use --dry-run on a CPU machine)"
fi

# 2. Inputs: the wide random model (weights on the GPU, saved in bf16), images, pseudo-labels.
if [[ -d "$WORK" && -n "$(ls -A "$WORK")" && ! -f "$WORK/inputs.json" ]]; then
  die "$WORK is not empty and holds no inputs.json: not a gpu_check folder, refusing to delete it"
fi
rm -rf "$WORK"; mkdir -p "$WORK"
keep() {  # the small outputs to $OUT (the device machine's return folder), whatever happened
  [[ -n "${OUT:-}" ]] || return 0
  mkdir -p "$OUT/gpu_check"
  for f in report.txt plan.txt voting_plan.txt parity.txt train.log votes_shared.log votes_copies.log inputs.json peak.json \
           votes_peak_shared.json votes_peak_copies.json smi.csv run/train_log.jsonl; do
    [[ -f "$WORK/$f" ]] && cp "$WORK/$f" "$OUT/gpu_check/" || true
  done
}
trap keep EXIT
python bench/make_wide_model.py "$WORK" --text-layers "$TEXT_LAYERS" --vision-depth "$VISION_DEPTH" \
  --pairs $((PAIRS * STEPS)) $([[ $DRY == 1 ]] && echo --meta)
TEXT_TOKENS=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['text_tokens'])" "$WORK/inputs.json")
PLAN_ARGS=(--gpus 1 --group-size $G --pairs-per-step $PAIRS --micro-batch-size $MICRO --max-new-tokens "$NEW_TOKENS"
           --text-tokens "$TEXT_TOKENS")
ls "$WORK/images" | sort | head -$((2 * VOTE_PAIRS)) > "$WORK/vote_images.txt"  # voting: VOTE_PAIRS distinct pairs
(( $(wc -l < "$WORK/vote_images.txt") * ($(wc -l < "$WORK/vote_images.txt") - 1) / 2 >= VOTE_PAIRS )) \
  || die "make_wide_model.py wrote too few images for $VOTE_PAIRS distinct pairs"
python bench/gpu_check_report.py "$WORK" --write-vote-wrapper sample_votes.py
vote_cmd() {  # the voting run through the wrapper of engine $1 (shared or copies): every pair in one call
  echo python "$WORK/vote_wrapper_$1.py" --model "$WORK/model" --images "$WORK/vote_images.txt" \
    --images-root "$WORK/images" --out "$WORK/votes_$1.jsonl" --num-pairs "$VOTE_PAIRS" --votes-per-pair "$VOTES" \
    --max-new-tokens "$VOTE_TOKENS" --reasoning --batch-size $((VOTES * VOTE_PAIRS)) --no-text
}
if [[ $DRY == 1 ]]; then
  for engine in shared copies; do
    python -c "import ast, sys; ast.parse(open(sys.argv[1]).read())" "$WORK/vote_wrapper_$engine.py"
    echo "gpu_check: voting would run: $(vote_cmd $engine)"
  done
  python bench/memory_plan.py --config "$WORK/model" --gpus 1 --voting --votes-per-pair "$VOTES" \
    --vote-tokens "$VOTE_TOKENS"
  python bench/memory_plan.py --config "$WORK/model" "${PLAN_ARGS[@]}" --no-check-meta  # make_wide_model checked it
  echo "gpu_check: dry run done (no training: it needs a GPU)"
  exit 0
fi

# 3. The run: torchrun, one process, through a wrapper that records peak memory; nvidia-smi samples beside it.
python bench/gpu_check_report.py "$WORK" --write-wrapper "$GRPO_TRAIN"
GPU=${CUDA_VISIBLE_DEVICES:-0}; GPU=${GPU%%,*}
nvidia-smi -i "$GPU" --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$WORK/smi.csv" &
SMI=$!
trap 'kill $SMI 2>/dev/null || true; keep' EXIT
set +e
timeout "$TIME_LIMIT" torchrun --standalone --nproc_per_node 1 "$WORK/wrapper.py" \
  --model "$WORK/model" --pseudolabels "$WORK/pseudolabels.jsonl" --images-root "$WORK/images" --out "$WORK/run" \
  --fsdp --bf16 --gradient-checkpointing --group-size $G --pairs-per-step $PAIRS --micro-batch-size $MICRO \
  --max-new-tokens "$NEW_TOKENS" --max-steps "$STEPS" --save-every 1000 --lr 1e-6 2>&1 | tee "$WORK/train.log"
RC=${PIPESTATUS[0]}
set -e
kill $SMI 2>/dev/null || true
[[ $RC == 0 ]] || die "grpo_train.py exited with $RC (124: over TIME_LIMIT=$TIME_LIMIT s); log: $WORK/train.log"
rm -rf "$WORK/run/checkpoints"  # the full training state: not needed from here on

# 4. Voting with the same weights, each engine in turn: K votes on VOTE_PAIRS pairs in one call (the trained weights
# are not needed; the wrapper makes the random model's answer lengths uneven).
for engine in shared copies; do
  set +e
  timeout "$VOTE_LIMIT" $(vote_cmd $engine) > "$WORK/votes_$engine.log" 2>&1
  VRC=$?
  set -e
  [[ $VRC == 0 ]] || echo "gpu_check: warning: voting ($engine) exited with $VRC (124: over VOTE_LIMIT=$VOTE_LIMIT s); log: $WORK/votes_$engine.log"
done

# 5. The plan for this model and these settings, the report; then drop the large files (the last step's full
# training state, the final weights).
set +e
timeout "$VOTE_LIMIT" python bench/gpu_check_report.py "$WORK" --engine-parity > "$WORK/parity.txt" 2>&1 \
  || echo "gpu_check: warning: the engine parity check failed; log: $WORK/parity.txt"
set -e
python bench/memory_plan.py --config "$WORK/model" "${PLAN_ARGS[@]}" --no-check-meta > "$WORK/plan.txt"
python bench/memory_plan.py --config "$WORK/model" --gpus 1 --voting --votes-per-pair "$VOTES" \
  --vote-tokens "$VOTE_TOKENS" > "$WORK/voting_plan.txt"
python bench/gpu_check_report.py "$WORK" --group-size $G --pairs-per-step $PAIRS --micro-batch-size $MICRO \
  --max-new-tokens "$NEW_TOKENS" | tee "$WORK/report.txt"
tail -1 "$WORK/parity.txt" | tee -a "$WORK/report.txt"
rm -rf "$WORK/run/checkpoints" "$WORK/run"/*.safetensors "$WORK/model"/*.safetensors
