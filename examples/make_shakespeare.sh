#!/usr/bin/env bash
# Re-creates examples/shakespeare/, the small demo GPT-2 that the README's first command generates with:
# a 4-layer, 64-wide GPT-2 with GPT-2's own 50,257-token BPE vocabulary, trained from random weights by
# `gpt2kit finetune` on tiny Shakespeare (examples/data/tinyshakespeare.txt, MIT) for about 7 minutes on
# two idle CPU cores, and stored in float16.
#
# Why this size: with GPT-2's vocabulary the token embedding alone is 50,257 x width parameters, so the
# width sets the file size. 64 wide gives 3.4M parameters: 6.8 MB in float16 (13.7 MB in float32), and
# with the vocabulary files (1.5 MB) the directory stays under 10 MB, small enough to commit. The context
# is 256 tokens, all of them trained (--block-size 256).
#
#   bash examples/make_shakespeare.sh        # then: git diff --stat examples/shakespeare
#
# Set GPT2KIT to run another gpt2kit (default: the repository's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

GPT2KIT=${GPT2KIT:-.venv/bin/python -m gpt2kit}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat > "$work/config.json" <<'JSON'
{"model_type": "gpt2", "vocab_size": 50257, "n_positions": 256, "n_embd": 64, "n_layer": 4, "n_head": 4}
JSON

# The tokenizer is GPT-2's, from the demo model's own directory (vocab.json + merges.txt never change).
# No validation split (one document); a fixed seed (a rerun gives the same model up to float rounding).
$GPT2KIT finetune --init scratch --config "$work/config.json" --tokenizer examples/shakespeare \
  --data examples/data/tinyshakespeare.txt --out "$work/run" \
  --steps 400 --batch-size 4 --block-size 256 --lr 6e-3 --warmup-steps 20 --seed 0 \
  --device cpu --dtype float32 --eval-every 0 --save-every 100 --sample-every 100 --prompt "ROMEO:" \
  --no-progress

$GPT2KIT convert "$work/run/final" "$work/shakespeare" --dtype float16
rm -f "$work/shakespeare/gpt2kit.json"  # (convert's note of its source, a temporary path here)
rm -rf examples/shakespeare.new
mv "$work/shakespeare" examples/shakespeare.new
rm -rf examples/shakespeare
mv examples/shakespeare.new examples/shakespeare
$GPT2KIT generate --model examples/shakespeare "ROMEO:" --length 60 --seed 1
