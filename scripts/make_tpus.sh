#!/usr/bin/env bash
# Create TPU VMs for training with the current `gcloud compute tpus tpu-vm` commands.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/make_tpus.sh [options] NAME ZONE TYPE [COUNT]

Create COUNT TPU VMs (default 1) of accelerator TYPE in ZONE, named NAME (COUNT = 1) or
NAME-0 .. NAME-<COUNT-1>, then print how to install the project and start training on them.

Arguments:
  NAME      TPU VM name (prefix when COUNT > 1), e.g. nm-tpu
  ZONE      zone, e.g. us-central1-a (v3) or us-central2-b (v4)
  TYPE      accelerator type, e.g. v3-8, v4-8, v5litepod-8
  COUNT     number of VMs to create (default 1)

Options:
  --version V     TPU software version (default tpu-ubuntu2204-base)
  --project P     Google Cloud project (default: gcloud's configured project)
  --spot          create Spot VMs (cheaper, can be preempted)
  --dry-run       print the gcloud commands instead of running them
  -h, --help      show this help

Example:
  scripts/make_tpus.sh --dry-run nm-tpu us-central1-a v3-8 2
USAGE
}

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

version="tpu-ubuntu2204-base"
project=""
spot=0
nm_option() {
    case "$1" in
        --version)
            nm_need_value "$@"
            version="$2"
            NM_SHIFT=2
            ;;
        --project)
            nm_need_value "$@"
            project="$2"
            NM_SHIFT=2
            ;;
        --spot)
            spot=1
            NM_SHIFT=1
            ;;
    esac
}
nm_parse_args "$@"

if [[ ${#NM_ARGS[@]} -lt 3 || ${#NM_ARGS[@]} -gt 4 ]]; then
    nm_usage_error "expected NAME ZONE TYPE [COUNT] (see --help)"
fi
name="${NM_ARGS[0]}"
zone="${NM_ARGS[1]}"
type="${NM_ARGS[2]}"
count="${NM_ARGS[3]:-1}"
if ! [[ "$count" =~ ^[1-9][0-9]*$ ]]; then
    nm_usage_error "COUNT must be a positive integer, got '$count'"
fi
if ! [[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
    # Google Cloud's rule for VM names (stricter than the run-name rule)
    nm_usage_error "NAME must be lower-case letters, digits and dashes, got '$name'"
fi

extra=()
if [[ -n "$project" ]]; then
    extra+=("--project=$project")
fi
if [[ $spot -eq 1 ]]; then
    extra+=("--spot")
fi

names=()
if [[ $count -eq 1 ]]; then
    names=("$name")
else
    for ((i = 0; i < count; i++)); do
        names+=("$name-$i")
    done
fi

for vm in "${names[@]}"; do
    nm_run gcloud compute tpus tpu-vm create "$vm" \
        "--zone=$zone" "--accelerator-type=$type" "--version=$version" "${extra[@]}"
done

cat <<NEXT
# next, on each VM (setup once, then train; see docs/DISTRIBUTED.md):
#   gcloud compute tpus tpu-vm ssh ${names[0]} --zone=$zone --worker=all --command='git clone <repo> neural-mechanics && cd neural-mechanics && python3 -m venv .venv-xla && .venv-xla/bin/pip install -r requirements-tpu.txt "torch-xla[tpu]==2.9.0"'
#   gcloud compute tpus tpu-vm ssh ${names[0]} --zone=$zone --worker=all --command='cd neural-mechanics && PJRT_DEVICE=TPU .venv-xla/bin/python train.py --tpu ${names[0]} --workers 8 --save-dir gs://<bucket>/results ...'
NEXT
