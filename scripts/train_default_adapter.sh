#!/usr/bin/env bash
# How the default adapter in Resources/Models was made: lay out the real images of ../shared/data (symlinks and
# derived label maps, nothing copied into the repository), train with `ssam train`, write the model card.
# The default recipe (400 steps): about 2-3 hours on an idle 2-core CPU, estimated from the 168-step run before (1 h).
# Usage: bash scripts/train_default_adapter.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-/tmp/ssam-default-data}"
export HF_HUB_OFFLINE=1
.venv/bin/python scripts/build_default_training_data.py "$DATA"
COMMAND=(.venv/bin/ssam train "$DATA/ct-mr" "$DATA/polyp-train" "$DATA/gland-train" "$DATA/nuclei-train"
         "$DATA/nuclei-he-train"
         --val-data "$DATA/val-ct" "$DATA/val-dcmqi" "$DATA/polyp-val" "$DATA/gland-val" "$DATA/nuclei-val"
         "$DATA/nuclei-he-val"
         --output Resources/Models/ssam-default.adapter.safetensors --seed 0 --overwrite
         --keep-largest liver --keep-largest spleen --budget 100)  # the default recipe in 100 minutes (docs/fine_tuning.md)
"${COMMAND[@]}"
.venv/bin/python scripts/write_model_card.py Resources/Models/ssam-default.adapter.safetensors \
    Resources/Models/ssam-default.md --command "${COMMAND[*]}"
