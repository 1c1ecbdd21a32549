#!/usr/bin/env bash
# Installs the independent tools the photo-scrubbing test runs (node/tests/node/photo_scrub.rs):
# - exiftool (Debian `libimage-exiftool-perl`): reads every metadata format a JPEG
#   or PNG can carry (EXIF, GPS, XMP, IPTC, Photoshop, comments, PNG text);
# - Pillow (PyPI, pinned) in the project venv target/py-venv (the one
#   python-fhir.sh uses): writes the real test photos with EXIF/GPS, comments and
#   PNG text, and decodes them before and after cleaning.
# Idempotent: installs only what is missing. apt needs root or sudo.
set -euo pipefail
cd "$(dirname "$0")/../.."

PILLOW_VERSION="11.3.0"
venv="${TELEMED_PY_VENV:-$PWD/target/py-venv}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

missing=()
command -v exiftool >/dev/null 2>&1 || missing+=(libimage-exiftool-perl)
command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]} (photo metadata checker)"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -x "$venv/bin/python" ] &&
  "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('pillow') != '$PILLOW_VERSION')" 2>/dev/null; then
  exit 0
fi
echo "== installing pillow==$PILLOW_VERSION into $venv (test photos)"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "pillow==$PILLOW_VERSION"
