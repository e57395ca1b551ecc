#!/usr/bin/env bash
# Build the job bundle that infra/kuberay/rayjob.yaml names as its working_dir: one
# top-level folder holding the curate package laid out as pip installs it (curate/,
# with stages/ as curate/stages/) and the pipelines/ folder (YAML, bundled data).
# Ray unpacks a remote working_dir zip and runs the entry point inside that folder,
# so `python -m curate.cli run pipelines/demo_text.yaml ...` finds both.
#
#   infra/job_bundle.sh [OUT.zip]          default build/curate-job-<version>.zip
#   aws s3 cp build/curate-job-0.1.0.zip s3://curate-artifacts/
#
# Dependencies are not in the bundle: the runtime environment installs
# requirements/lock.txt (or the image carries them).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
version=$("$python" -c 'import tomllib, sys; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$repo/pyproject.toml")
out=${1:-$repo/build/curate-job-$version.zip}
case $out in /*) ;; *) out=$PWD/$out ;; esac

tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT
bundle=$tmp/curate-job

# Build from a copy: an in-tree build would leave build/ and egg-info in the repo.
mkdir -p "$tmp/src"
(cd "$repo" && tar --exclude='__pycache__' --exclude='*.pyc' -cf - pyproject.toml README.md \
  curate stages) | tar -xf - -C "$tmp/src"
"$python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
  --no-compile --target "$bundle" "$tmp/src" 2> "$tmp/pip.log" || { cat "$tmp/pip.log" >&2; exit 1; }
rm -rf -- "$bundle"/*.dist-info "$bundle"/bin
mkdir -p "$bundle/pipelines"
# The pipelines folder without caches (models/ is kept: pipelines name files in it).
(cd "$repo" && tar --exclude='__pycache__' --exclude='*.pyc' -cf - pipelines) | tar -xf - -C "$bundle"

mkdir -p "$(dirname "$out")"
rm -f -- "$out"
(cd "$tmp" && "$python" -m zipfile -c "$out" curate-job)
size=$(du -h "$out" | cut -f1)
echo "job bundle: $out ($size)"
