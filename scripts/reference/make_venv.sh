#!/usr/bin/env bash
# Build the reference-oracle venv (SAELens + circuit-tracer) OUTSIDE the repo.
# They cannot live beside HexRay's recorder: sae-lens 6.54 pins transformer-lens<4 and circuit-tracer 0.5
# pins transformers<=4.57.3, while the recorder needs TransformerLens 4 / transformers 5.
# Usage: scripts/reference/make_venv.sh [VENV_DIR]   (default /work/refvenv)
set -euo pipefail
VENV="${1:-/work/refvenv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip
# torch first and pinned, so the resolver never pulls an unpinned (CUDA) build.
"$VENV/bin/pip" install torch==2.13.0
"$VENV/bin/pip" install circuit-tracer==0.5.0 sae-lens==6.54.12 'transformers>=4.56,<=4.57.3' \
    'transformer-lens>=2.16.1,<4'
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
for p in ("torch", "circuit-tracer", "sae-lens", "transformer-lens", "transformers", "tokenizers", "safetensors"):
    print(p, version(p))
PY
