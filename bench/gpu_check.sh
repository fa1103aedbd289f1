#!/bin/sh
# GPU readiness in one command; bench/gpu_check.py says what it runs. PYTHON: the interpreter with torch.
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
