#!/usr/bin/env bash
# Multi-node run with plain torchrun: start the same command on each of NNODES nodes (NODE_RANK 0 .. NNODES-1), all
# on one shared file system (the cache and the run folder: NFS, Lustre, GPFS, BeeGFS). Defaults: the paper's 128
# GPUs as 16 nodes x 8, the Qwen2-VL-72B dump and the Qwen2-VL-72B -> 2B GenRecal recipe.
#
#   # 1. on every node; wait until all are done (a worker that stops: rerun it, it resumes):
#   MASTER_ADDR=node0 NODE_RANK=3 bash recipes/launch/torchrun.sh dump --data /data/train.json --image-root /data/img
#   # 2. then on every node:
#   MASTER_ADDR=node0 NODE_RANK=3 bash recipes/launch/torchrun.sh train
#
# dump: one worker per node (torchrun --nproc_per_node 1), which holds the whole node: vLLM writes the answers with
#   tensor parallel 8 (its child process sees this worker's 8 GPUs), then the HF feature pass spreads the teacher
#   over them (device_map auto). torchrun's RANK / WORLD_SIZE split the data; each worker commits its own shards.
# train: 8 ranks per node, FSDP2 across all 128 (the recipe's fsdp: true), one stage after another; stage N reads
#   OUT/stage{N-1} from the shared run folder. Extra arguments go to every stage (e.g. --save-every 100).
# The two phases are separate commands because torchrun's rendezvous would time out while slower nodes still dump.
set -euo pipefail
: "${MASTER_ADDR:?the first node's address}" "${NODE_RANK:?this node's index, 0 .. NNODES-1}"
NNODES=${NNODES:-16}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
DUMP=${DUMP:-recipes/dump-qwen2-vl-72b.yaml}
RECIPE=${RECIPE:-recipes/genrecal-qwen2-vl-72b-to-2b.yaml}
STAGES=${STAGES:-1 2 3}
phase=${1:?dump or train}
shift
nodes=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")

case $phase in
  dump)
    torchrun "${nodes[@]}" --nproc_per_node 1 -m pipeline.cli dump-teacher --config "$DUMP" --no-progress "$@" ;;
  train)
    for stage in $STAGES; do
      torchrun "${nodes[@]}" --nproc_per_node "$GPUS_PER_NODE" \
        -m student.cli train --config "$RECIPE" --stage "$stage" --no-progress "$@"
    done ;;
  *) echo "usage: $0 dump|train [options]" >&2; exit 2 ;;
esac
