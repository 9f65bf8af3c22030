#!/bin/bash
# Fetch the service's Python packages as wheels for a GPU machine that cannot reach a
# package index, so that benchmarks/gpu_checks.sh can measure prediction through the
# service there too. Run it here, from the repository root, after `make install`:
#
#   bash benchmarks/gpu_wheels.sh            # wheels for Python 3.12 into .whl/
#   bash benchmarks/gpu_wheels.sh 3.11 DIR   # another Python, another folder
#
# The folder gets the service's direct needs (pinned to the versions installed in .venv,
# which the tests ran) with everything they need in turn, and requirements.txt naming the
# direct ones. gpu_checks.sh installs them with pip against what the machine already has,
# so pip adds only what is missing there. torch, numpy and Pillow are not fetched: the
# GPU machine's own builds stay. Git ignores .whl/: name it in the device call's carry.
set -euo pipefail
python_version=${1:-3.12}
dest=${2:-.whl}
venv_pip=.venv/bin/pip
[ -x "$venv_pip" ] || { echo "run 'make install' first: the versions come from .venv" >&2; exit 1; }

# The service's direct needs besides the engine's (pyproject.toml), without PostgreSQL's
# driver: the benchmarks run the embedded default (SQLite).
direct="fastapi uvicorn python-multipart sqlalchemy alembic celery redis pydantic-settings
prometheus-client httpx jinja2 itsdangerous"
mkdir -p "$dest"
frozen=$("$venv_pip" freeze --all 2>/dev/null)
: >"$dest/requirements.txt"
for name in $direct; do
    pin=$(grep -i -E "^${name//-/[-_]}==" <<<"$frozen") || { echo "$name is not in .venv" >&2; exit 1; }
    echo "$pin" >>"$dest/requirements.txt"
done

platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
# (The filter drops pip's notes about index folders of this machine that hold no such package.)
"$venv_pip" download --quiet --only-binary=:all: --python-version "$python_version" \
    --implementation cp "${platforms[@]}" -d "$dest" -r "$dest/requirements.txt" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "$(ls "$dest"/*.whl | wc -l) wheels, $(du -sh "$dest" | cut -f1), in $dest for Python $python_version"
