# Sourced by scripts/run and scripts/test: make .venv if missing and install
# the package into it (again only when setup.py or requirements.txt change).
# Usage: . scripts/_venv.sh EXTRAS   (EXTRAS: "" or "test")
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# VENV and PYTHON may be set by the caller (scripts/test --python 3.13).
VENV=${VENV:-.venv}
CONSTRAINTS=scripts/constraints.txt
if [ ! -x "$VENV/bin/python" ]; then
    PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
    echo "creating $VENV with $PYTHON" >&2
    "$PYTHON" -m venv "$VENV"
fi
extras=${1:-}
target=.
[ -n "$extras" ] && target=".[$extras]"
stamp="$VENV/.installed${extras:+-$extras}"
# setup.py compiles the hot path with mypyc when it can, unless GREENTASK_COMPILE=0:
# install again when that choice changes, or when a compiled module (of this
# venv's Python) is older than its source, which would run the old code.
compile=${GREENTASK_COMPILE:-1}
suffix=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
stale=""
if [ -f "$stamp" ] && [ "$(cat "$stamp")" != "compile=$compile" ]; then
    stale=1
fi
while IFS= read -r -d '' compiled; do
    if [ "${compiled%"$suffix"}.py" -nt "$compiled" ]; then
        stale=1
    fi
done < <(find greentask -name "*$suffix" -print0)
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ requirements.txt -nt "$stamp" ] ||
        [ "$CONSTRAINTS" -nt "$stamp" ] || [ -n "$stale" ]; then
    echo "installing greentask${extras:+ with $extras extras} into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    # mypyc comes from this venv, so the build is not isolated from it.
    "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" setuptools mypy >&2
    find greentask -name "*$suffix" -delete
    "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" --no-build-isolation \
        -e "$target" >&2
    if [ "$compile" != 0 ] && [ -z "$(find greentask -name "*$suffix" -print -quit)" ]; then
        echo "warning: the hot path did not compile (mypyc needs a C compiler and" \
             "Python's headers); it runs as Python, with about a quarter more CPU per request" >&2
    fi
    echo "compile=$compile" > "$stamp"
fi
