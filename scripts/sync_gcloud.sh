#!/usr/bin/env bash
# Copy a run's results down from Google Cloud Storage or a TPU VM for analysis.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/sync_gcloud.sh [options] SAVE_DIR EXPERIMENT [EXPID]

Copy the run folder SAVE_DIR/EXPERIMENT/EXPID (or every run of EXPERIMENT) to
DEST/EXPERIMENT[/EXPID], the layout extract.py, cache.py and plot.py read with
--save-dir DEST. Files already present and unchanged are not copied again.

EXPERIMENT and EXPID follow train.py's run-name rule (1-100 letters, digits, '.', '_' or
'-', starting with a letter or digit). SAVE_DIR is train.py's --save-dir: a gs://BUCKET/PATH
URL, copied with `gcloud storage rsync`, or, with --tpu and --zone, a folder on a TPU VM
(plain path characters only), copied with `gcloud compute tpus tpu-vm scp`.

Options:
  --dest DIR          local save dir (default results)
  --tpu NAME          copy from TPU VM NAME instead of Cloud Storage
  --zone ZONE         zone of the TPU VM (required with --tpu)
  --worker N          TPU VM worker to copy from (default 0, where rank 0 saves)
  --project P         Google Cloud project
  --no-checkpoints    skip ckpt/ folders (copy features.h5, caches, metrics, JSON only)
  --dry-run           print the commands instead of running them
  -h, --help          show this help

Examples:
  scripts/sync_gcloud.sh gs://my-bucket/results demo run1
  scripts/sync_gcloud.sh --no-checkpoints --dest analysis gs://my-bucket/results demo
  scripts/sync_gcloud.sh --tpu nm-tpu --zone us-central1-a neural-mechanics/results demo run1
USAGE
}

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

dest_root="results"
tpu=""
zone=""
worker=0
project=""
no_ckpt=0
nm_option() {
    case "$1" in
        --dest)
            nm_need_value "$@"
            dest_root="$2"
            NM_SHIFT=2
            ;;
        --tpu)
            nm_need_value "$@"
            tpu="$2"
            NM_SHIFT=2
            ;;
        --zone)
            nm_need_value "$@"
            zone="$2"
            NM_SHIFT=2
            ;;
        --worker)
            nm_need_value "$@"
            worker="$2"
            NM_SHIFT=2
            ;;
        --project)
            nm_need_value "$@"
            project="$2"
            NM_SHIFT=2
            ;;
        --no-checkpoints)
            no_ckpt=1
            NM_SHIFT=1
            ;;
    esac
}
nm_parse_args "$@"

if [[ ${#NM_ARGS[@]} -lt 2 || ${#NM_ARGS[@]} -gt 3 ]]; then
    nm_usage_error "expected SAVE_DIR EXPERIMENT [EXPID] (see --help)"
fi
save_dir="${NM_ARGS[0]%/}"
nm_check_name EXPERIMENT "${NM_ARGS[1]}"
run_path="${NM_ARGS[1]}"
if [[ ${#NM_ARGS[@]} -eq 3 ]]; then
    nm_check_name EXPID "${NM_ARGS[2]}"
    run_path="$run_path/${NM_ARGS[2]}"
fi
if ! [[ "$worker" =~ ^[0-9]+$ ]]; then
    nm_usage_error "--worker must be a number, got '$worker'"
fi

source_path="$save_dir/$run_path"
dest="$dest_root/$run_path"
extra=()
if [[ -n "$project" ]]; then
    extra+=("--project=$project")
fi

if [[ -z "$tpu" ]]; then
    if [[ "$save_dir" != gs://* ]]; then
        nm_usage_error "SAVE_DIR must be a gs:// URL, or pass --tpu NAME --zone ZONE"
    fi
    flags=(--recursive)
    if [[ $no_ckpt -eq 1 ]]; then
        flags+=("--exclude=(^|.*/)ckpt/.*")
    fi
    nm_run mkdir -p "$dest"
    nm_run gcloud storage rsync "${flags[@]}" "${extra[@]}" "$source_path" "$dest"
    exit 0
fi

if [[ -z "$zone" ]]; then
    nm_usage_error "--tpu needs --zone"
fi
if ! [[ "$save_dir" =~ ^[A-Za-z0-9._/~+-]+$ ]]; then
    # scp hands remote paths to a shell on the VM: only plain path characters
    nm_usage_error "with --tpu, SAVE_DIR must be a plain path (letters, digits, . _ / ~ + -), got '$save_dir'"
fi
parent="$(dirname "$dest")"
leaf="$(basename "$run_path")"
nm_run mkdir -p "$parent"
if [[ $no_ckpt -eq 1 ]]; then
    archive="/tmp/nm-sync-$leaf.tar"
    remote="$(nm_quote tar -C "$(dirname "$source_path")" --exclude=ckpt -cf "$archive" "$leaf")"
    nm_run gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" "--worker=$worker" "${extra[@]}" \
        "--command=$remote"
    nm_run gcloud compute tpus tpu-vm scp "$tpu:$archive" "$parent/" "--zone=$zone" \
        "--worker=$worker" "${extra[@]}"
    nm_run tar -C "$parent" -xf "$parent/$(basename "$archive")"
    nm_run rm -f "$parent/$(basename "$archive")"
else
    nm_run gcloud compute tpus tpu-vm scp --recurse "$tpu:$source_path" "$parent/" \
        "--zone=$zone" "--worker=$worker" "${extra[@]}"
fi
