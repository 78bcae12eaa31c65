#!/usr/bin/env bash
# Everything the tests need, on a fresh Debian/Ubuntu machine, in one command:
#
#     bash scripts/setup-dev.sh          # then: python3 -m pytest -q
#
# 1. system packages (apt-get; as root, or through sudo): a virtual X screen, headless
#    OpenGL, the tools the tests drive for real (ffmpeg, ImageMagick, JACK, Pd, Chromium...);
# 2. torch first, on its own, so that you choose the build: the extras below would otherwise
#    pull whatever build the package index offers (on Linux, often a multi-GB CUDA one);
# 3. dreamdeck itself, editable, with the test, diffusion, ONNX and docs extras;
# 4. taming-transformers' VQGAN network (tests only: the VQGAN loader is checked against it).
#
# Settings (environment variables):
#   PYTHON                 the interpreter to install into (default python3; use a venv's
#                          python where the system refuses pip installs outside one)
#   DREAMDECK_TORCH        the torch requirement (default torch==2.13.0, the version CI runs)
#   DREAMDECK_TORCH_PIP    extra pip arguments for torch alone: the --index-url of the CPU or
#                          CUDA wheels that the install selector on pytorch.org gives for your
#                          machine, e.g. DREAMDECK_TORCH_PIP="--index-url <the CUDA 12.x wheels>"
#   DREAMDECK_SKIP_APT=1   skip the system packages (already there, or not Debian/Ubuntu)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${DREAMDECK_TORCH:-torch==2.13.0}"
read -r -a TORCH_PIP <<< "${DREAMDECK_TORCH_PIP:-}"

if [[ "${DREAMDECK_SKIP_APT:-0}" != 1 ]]; then
    if ! command -v apt-get >/dev/null; then
        echo "setup-dev: no apt-get here: install the system packages listed in $0 by hand," \
             "then run again with DREAMDECK_SKIP_APT=1" >&2
        exit 1
    fi
    SUDO=()
    if [[ "$(id -u)" != 0 ]]; then
        SUDO=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -qq
    # xvfb + xauth: real windows on a virtual screen; libegl/mesa: headless OpenGL (llvmpipe);
    # imagemagick: screenshots of the virtual screen; ffmpeg: video files as camera stand-ins and
    # the recorder; jackd2: MIDI through virtual ports on a dummy JACK server; liblo-tools and
    # puredata-core: independent OSC clients; chromium + driver: the status page in a real browser;
    # libportaudio2: sounddevice imports; xdg-utils / x11-xserver-utils: screensaver inhibition.
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
        xvfb xauth x11-utils libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri libglx-mesa0 \
        imagemagick ffmpeg jackd2 liblo-tools puredata-core chromium chromium-driver \
        libportaudio2 xdg-utils x11-xserver-utils >/dev/null
fi

"$PYTHON" -m pip install -q "${TORCH_PIP[@]}" "$TORCH_SPEC"
# docs: mkdocs, for `mkdocs build --strict`
"$PYTHON" -m pip install -q -e ".[dev,diffusion,onnx,docs]"
# --no-deps: only its torch-only modules are imported (no pytorch-lightning).
"$PYTHON" -m pip install -q --no-deps taming-transformers-rom1504==0.0.6

"$PYTHON" - <<'EOF'
import torch

print(f"setup-dev: ready (torch {torch.__version__}, CUDA {torch.cuda.is_available()}); "
      "run the tests with: python3 -m pytest -q")
EOF
