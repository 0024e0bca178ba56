#!/usr/bin/env bash
# Pre-train through the DeepSpeed launcher (engine at ZeRO stage 0 around our sharded optimizer).
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/deepspeed.sh CONFIG [pretrain args...]

Runs `deepspeed --num_gpus NGPU --module pretrain --config CONFIG --deepspeed DS_CONFIG [pretrain args...]`;
everything after CONFIG is passed to pretrain unchanged.

environment:
  DS_CONFIG    DeepSpeed JSON (default configs/deepspeed/zero0.json; must be ZeRO stage 0:
               the optimizer shards itself by whole matrices, see optim/sharded.py)
  NGPU         processes per node (default: the GPUs nvidia-smi lists, else 1)
  HOSTFILE     MPI-style hostfile for several nodes ("node0 slots=8" per line); default: this node
  MASTER_ADDR, MASTER_PORT   rendezvous of several nodes (default: DeepSpeed's)
  DEEPSPEED    launcher command (default: deepspeed)
  PYTHON       interpreter for the config check (default: python)
  DRY_RUN=1    print the command instead of running it

The config is checked once (`python -m pretrain --check`, at the full world size) before any rank
starts: a config error is one line, not one per rank under the launcher's report.

example:
  launch/deepspeed.sh configs/llama_7b_subtrack8bit.yaml --set train.max_steps=1000
USAGE
}

if [[ $# -eq 0 ]]; then usage >&2; exit 2; fi
if [[ "$1" == "-h" || "$1" == "--help" ]]; then usage; exit 0; fi
CONFIG="$1"; shift
DS_CONFIG="${DS_CONFIG:-configs/deepspeed/zero0.json}"
for f in "$CONFIG" "$DS_CONFIG"; do
    if [[ ! -f "$f" ]]; then
        echo "launch/deepspeed.sh: config file '$f' not found (see configs/ and configs/deepspeed/)" >&2
        exit 2
    fi
done

if [[ -z "${NGPU:-}" ]]; then
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$NGPU" -ge 1 ]] || NGPU=1
fi
nodes=()
if [[ -n "${HOSTFILE:-}" ]]; then nodes+=(--hostfile "$HOSTFILE"); fi
if [[ -n "${MASTER_ADDR:-}" ]]; then nodes+=(--master_addr "$MASTER_ADDR"); fi
if [[ -n "${MASTER_PORT:-}" ]]; then nodes+=(--master_port "$MASTER_PORT"); fi
cmd=("${DEEPSPEED:-deepspeed}" "${nodes[@]}" --num_gpus "$NGPU" --module pretrain
     --config "$CONFIG" --deepspeed "$DS_CONFIG" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${cmd[*]}"; exit 0; fi
HOSTS=1
if [[ -n "${HOSTFILE:-}" ]]; then HOSTS=$(grep -cEv '^[[:space:]]*(#|$)' "$HOSTFILE" || true); fi
WORLD_SIZE=$((NGPU * ${HOSTS:-1})) "${PYTHON:-python}" -m pretrain --check --config "$CONFIG" --deepspeed "$DS_CONFIG" "$@" \
    || exit $?
exec "${cmd[@]}"
