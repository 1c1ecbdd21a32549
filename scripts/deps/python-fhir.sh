#!/usr/bin/env bash
# Installs the independent FHIR R4 validator the FHIR API test runs: the PyPI
# package `fhir.resources` 6.1 (pydantic models of every FHIR resource; FHIR
# R4 4.0.1 is its default release; later 6.x default to R4B) in a project venv at
# target/py-venv. Idempotent: does nothing when the pinned version is present.
# The test (node/tests/node/fhir_api.rs) finds the venv through TELEMED_PY_VENV or
# this default path, and fails if it is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

FHIR_RESOURCES_VERSION="6.1.0"
venv="${TELEMED_PY_VENV:-$PWD/target/py-venv}"

if ! command -v python3 >/dev/null 2>&1; then
  echo "== installing python3 (FHIR validator)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq python3 python3-venv >/dev/null
fi

if [ -x "$venv/bin/python" ] &&
  "$venv/bin/python" -c "import importlib.metadata as m, sys, fhir.resources as f; sys.exit(m.version('fhir.resources') != '$FHIR_RESOURCES_VERSION' or f.__fhir_version__ != '4.0.1')" 2>/dev/null; then
  exit 0
fi
echo "== installing fhir.resources==$FHIR_RESOURCES_VERSION into $venv (FHIR R4 validator)"
python3 -m venv "$venv"
# fhir.resources 6.x is built on pydantic 1 (pip would otherwise pick pydantic 2).
"$venv/bin/python" -m pip install -q --disable-pip-version-check "fhir.resources==$FHIR_RESOURCES_VERSION" "pydantic>=1.10,<2"
"$venv/bin/python" -c "import fhir.resources as f; assert f.__fhir_version__ == '4.0.1', f.__fhir_version__"
