#!/usr/bin/env bash
# Pre-train with torchrun on one node, or on one node of several (run it once per node).
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/torchrun.sh CONFIG [pretrain args...]

Runs `python -m torch.distributed.run ... -m pretrain --config CONFIG [pretrain args...]`;
everything after CONFIG is passed to pretrain unchanged (--set key=value, --resume auto, ...).

environment:
  NGPU         processes per node (default: the GPUs nvidia-smi lists, else 1)
  NNODES       number of nodes (default 1; >1 needs the next three on every node)
  NODE_RANK    this node's rank, 0..NNODES-1 (default 0)
  MASTER_ADDR  address of node 0 (default localhost)
  MASTER_PORT  port on node 0 (default 29500)
  PYTHON       interpreter (default: python)
  DRY_RUN=1    print the command instead of running it

The config is checked once (`python -m pretrain --check`, at the full world size) before any rank
starts: a config error is one line, not one per rank under torchrun's failure report.

examples:
  launch/torchrun.sh configs/tiny_sample.yaml --set train.max_steps=50
  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh configs/llama_1b_subtrack.yaml   # on node0
  NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh configs/llama_1b_subtrack.yaml   # on node1
USAGE
}

if [[ $# -eq 0 ]]; then usage >&2; exit 2; fi
if [[ "$1" == "-h" || "$1" == "--help" ]]; then usage; exit 0; fi
CONFIG="$1"; shift
if [[ ! -f "$CONFIG" ]]; then
    echo "launch/torchrun.sh: config file '$CONFIG' not found (see configs/)" >&2
    exit 2
fi

if [[ -z "${NGPU:-}" ]]; then
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$NGPU" -ge 1 ]] || NGPU=1
fi
NNODES="${NNODES:-1}"
if [[ "$NNODES" -gt 1 ]]; then
    placement=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}"
               --master_addr "${MASTER_ADDR:-localhost}" --master_port "${MASTER_PORT:-29500}")
else
    placement=(--standalone --nnodes 1)
fi
# SIGUSR1 (SLURM's preemption warning) reaches the workers, which save and exit 0.
cmd=("${PYTHON:-python}" -m torch.distributed.run "${placement[@]}" --nproc_per_node "$NGPU"
     --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
     -m pretrain --config "$CONFIG" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${cmd[*]}"; exit 0; fi
WORLD_SIZE=$((NGPU * NNODES)) "${PYTHON:-python}" -m pretrain --check --config "$CONFIG" "$@" || exit $?
exec "${cmd[@]}"
