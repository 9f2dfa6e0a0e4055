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
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ requirements.txt -nt "$stamp" ] ||
        [ "$CONSTRAINTS" -nt "$stamp" ]; then
    echo "installing greentask${extras:+ with $extras extras} into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" -e "$target" >&2
    touch "$stamp"
fi
