#!/usr/bin/env bash
# Install the ffcv extra into the venv whose python is $1. Needs pkg-config, OpenCV and libjpeg-turbo headers.
set -u
PY=${1:-.venv/bin/python}
if "$PY" -c "import ffcv" 2>/dev/null; then exit 0; fi
if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pkg-config libturbojpeg0-dev libopencv-dev >/dev/null
  else
    echo "ffcv: skipped (needs: apt-get install pkg-config libturbojpeg0-dev libopencv-dev, as root)"; exit 0
  fi
fi
"$PY" -m pip install -q -e '.[ffcv]' || echo "ffcv: install failed; .beton data will be unavailable"
