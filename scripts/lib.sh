#!/usr/bin/env bash
# Shared by make_tpus.sh, sync_gcloud.sh and kill_all.sh (sourced, never run): option parsing,
# --dry-run, one-line usage errors, the run-name rule and quoting for remote shells.
#
# A script sets NM_PROG, defines usage() and nm_option() (its own options: set NM_SHIFT to the
# number of words used, leave it 0 for an unknown option), then calls nm_parse_args "$@";
# positional arguments are left in NM_ARGS.

# The run-name rule of Utils/names.py (NAME_PATTERN), character for character.
NM_NAME_RE='^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$'
NM_PROG="${NM_PROG:-$(basename "$0")}"
NM_DRY_RUN=0
NM_SHIFT=0
NM_ARGS=()

# nm_usage_error MESSAGE: one line on stderr, exit 2 (as argparse does).
nm_usage_error() {
    echo "$NM_PROG: $1" >&2
    exit 2
}

# nm_need_value OPTION [VALUE ...]: exits with a usage error unless OPTION has a non-empty value.
nm_need_value() {
    if [[ $# -lt 2 || -z "$2" ]]; then
        nm_usage_error "$1 needs a value (see --help)"
    fi
}

# nm_parse_args "$@": -h/--help, --dry-run and unknown options here, the rest via nm_option.
nm_parse_args() {
    NM_ARGS=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -h | --help)
                usage
                exit 0
                ;;
            --dry-run)
                NM_DRY_RUN=1
                shift
                ;;
            -*)
                NM_SHIFT=0
                nm_option "$@"
                if [[ $NM_SHIFT -eq 0 ]]; then
                    nm_usage_error "unknown option $1 (see --help)"
                fi
                shift "$NM_SHIFT"
                ;;
            *)
                NM_ARGS+=("$1")
                shift
                ;;
        esac
    done
}

# nm_valid_name NAME: whether NAME follows the run-name rule (byte-wise, whatever the locale).
nm_valid_name() {
    local LC_ALL=C
    [[ "$1" =~ $NM_NAME_RE ]]
}

# nm_check_name WHAT NAME: a usage error unless NAME is a valid run name.
nm_check_name() {
    if ! nm_valid_name "$2"; then
        nm_usage_error "$1 must be 1-100 letters, digits, '.', '_' or '-' starting with a letter or digit, got '$2'"
    fi
}

# nm_quote WORD...: the words quoted for a remote bash (printf %q), separated by spaces.
nm_quote() {
    local out
    printf -v out ' %q' "$@"
    printf '%s' "${out# }"
}

# nm_run COMMAND...: runs it, or with --dry-run prints it quoted on one line.
nm_run() {
    if [[ $NM_DRY_RUN -eq 1 ]]; then
        nm_quote "$@"
        printf '\n'
    else
        "$@"
    fi
}
