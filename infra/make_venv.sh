#!/bin/sh
# Create the project virtualenv.  Debian ships venv support in a separate
# package (python3.X-venv); install it when missing and we may use apt.
set -eu
python=$1
venv=$2
[ -x "$venv/bin/pip" ] && exit 0
if [ -z "$python" ]; then
  echo "error: no python3.11 or python3 on PATH; install Python 3.11 first" >&2
  exit 1
fi
if ! "$python" -m venv "$venv" 2>/dev/null; then
  rm -rf "$venv"
  version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing python$version-venv with apt-get" >&2
    apt-get update -qq && apt-get install -y -qq "python$version-venv"
  else
    echo "error: '$python -m venv' failed; on Debian run: sudo apt-get install python$version-venv" >&2
    exit 1
  fi
  "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --disable-pip-version-check -q --upgrade "pip>=24"
