#!/usr/bin/env bash
# Serve TensorBoard for the runs directory on localhost only.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/tensorboard.sh [LOGDIR] [tensorboard args...]

Serves LOGDIR (default: runs/) at http://127.0.0.1:PORT/, bound to localhost only; from another
machine use an SSH tunnel: ssh -L PORT:127.0.0.1:PORT HOST.

environment:
  PORT         port (default 6006)
  PYTHON       interpreter (default: python)
  DRY_RUN=1    print the command instead of running it
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
LOGDIR="${1:-runs}"
[[ $# -gt 0 ]] && shift
if [[ ! -d "$LOGDIR" ]]; then
    echo "launch/tensorboard.sh: log directory '$LOGDIR' not found (runs write to runs/<name>/ by default)" >&2
    exit 2
fi
cmd=("${PYTHON:-python}" -m tensorboard.main --logdir "$LOGDIR" --host 127.0.0.1 --port "${PORT:-6006}" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${cmd[*]}"; exit 0; fi
exec "${cmd[@]}"
