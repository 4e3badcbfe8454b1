#!/usr/bin/env bash
# Copy a run's results down from Google Cloud Storage or a TPU VM for analysis.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/sync_gcloud.sh [options] SAVE_DIR EXPERIMENT [EXPID]

Copy the run folder SAVE_DIR/EXPERIMENT/EXPID (or every run of EXPERIMENT) to
DEST/EXPERIMENT[/EXPID], the layout extract.py, cache.py and plot.py read with
--save-dir DEST. Files already present and unchanged are not copied again.

SAVE_DIR is train.py's --save-dir: a gs://BUCKET/PATH URL, copied with
`gcloud storage rsync`, or, with --tpu and --zone, a folder on a TPU VM, copied with
`gcloud compute tpus tpu-vm scp`.

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

dry_run=0
dest_root="results"
tpu=""
zone=""
worker=0
project=""
no_ckpt=0
positional=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help)
            usage
            exit 0
            ;;
        --dry-run)
            dry_run=1
            shift
            ;;
        --dest)
            dest_root="${2:?--dest needs a value}"
            shift 2
            ;;
        --tpu)
            tpu="${2:?--tpu needs a value}"
            shift 2
            ;;
        --zone)
            zone="${2:?--zone needs a value}"
            shift 2
            ;;
        --worker)
            worker="${2:?--worker needs a value}"
            shift 2
            ;;
        --project)
            project="${2:?--project needs a value}"
            shift 2
            ;;
        --no-checkpoints)
            no_ckpt=1
            shift
            ;;
        -*)
            echo "sync_gcloud.sh: unknown option $1 (see --help)" >&2
            exit 2
            ;;
        *)
            positional+=("$1")
            shift
            ;;
    esac
done

if [[ ${#positional[@]} -lt 2 || ${#positional[@]} -gt 3 ]]; then
    echo "sync_gcloud.sh: expected SAVE_DIR EXPERIMENT [EXPID] (see --help)" >&2
    exit 2
fi
save_dir="${positional[0]%/}"
run_path="${positional[1]}"
if [[ ${#positional[@]} -eq 3 ]]; then
    run_path="$run_path/${positional[2]}"
fi
for part in "${positional[@]:1}"; do
    if [[ -z "$part" || "$part" == *"/"* || "$part" == "." || "$part" == ".." ]]; then
        echo "sync_gcloud.sh: EXPERIMENT and EXPID must be plain names, got '$part'" >&2
        exit 2
    fi
done
if ! [[ "$worker" =~ ^[0-9]+$ ]]; then
    echo "sync_gcloud.sh: --worker must be a number, got '$worker'" >&2
    exit 2
fi

run() {
    if [[ $dry_run -eq 1 ]]; then
        printf '%q' "$1"
        shift
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

source_path="$save_dir/$run_path"
dest="$dest_root/$run_path"
extra=()
if [[ -n "$project" ]]; then
    extra+=("--project=$project")
fi

if [[ -z "$tpu" ]]; then
    if [[ "$save_dir" != gs://* ]]; then
        echo "sync_gcloud.sh: SAVE_DIR must be a gs:// URL, or pass --tpu NAME --zone ZONE" >&2
        exit 2
    fi
    flags=(--recursive)
    if [[ $no_ckpt -eq 1 ]]; then
        flags+=("--exclude=(^|.*/)ckpt/.*")
    fi
    run mkdir -p "$dest"
    run gcloud storage rsync "${flags[@]}" "${extra[@]}" "$source_path" "$dest"
    exit 0
fi

if [[ -z "$zone" ]]; then
    echo "sync_gcloud.sh: --tpu needs --zone" >&2
    exit 2
fi
parent="$(dirname "$dest")"
leaf="$(basename "$run_path")"
run mkdir -p "$parent"
if [[ $no_ckpt -eq 1 ]]; then
    archive="/tmp/nm-sync-$leaf.tar"
    remote="tar -C $(printf '%q' "$(dirname "$source_path")") --exclude=ckpt -cf $archive $(printf '%q' "$leaf")"
    run gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" "--worker=$worker" "${extra[@]}" \
        "--command=$remote"
    run gcloud compute tpus tpu-vm scp "$tpu:$archive" "$parent/" "--zone=$zone" \
        "--worker=$worker" "${extra[@]}"
    run tar -C "$parent" -xf "$parent/$(basename "$archive")"
    run rm -f "$parent/$(basename "$archive")"
else
    run gcloud compute tpus tpu-vm scp --recurse "$tpu:$source_path" "$parent/" \
        "--zone=$zone" "--worker=$worker" "${extra[@]}"
fi
