#!/usr/bin/env bash
# Installs the independent checkers the privacy tests run (node/tests/node/deid_tools.rs):
# - dicom3tools (Debian): `dciodvfy`, David Clunie's IOD verifier, checks that a
#   de-identified DICOM file still conforms to its IOD;
# - dcmtk (Debian): `dcmdump` parses it (also installed by scripts/test.sh);
# - libxml2-utils (Debian): `xmllint`, the XML parser the ATNA audit export test uses.
# Idempotent: installs only what is missing. Needs root or sudo.
set -euo pipefail

missing=()
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v dcmdump >/dev/null 2>&1 || missing+=(dcmtk)
command -v xmllint >/dev/null 2>&1 || missing+=(libxml2-utils)
[ ${#missing[@]} -eq 0 ] && exit 0

echo "== installing ${missing[*]} (privacy checkers)"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq "${missing[@]}" >/dev/null
