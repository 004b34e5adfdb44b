# Sourced by the long-run study scripts, before anything starts: `-h` or `--help` prints the
# script's header comment and exits 0; an option the script does not take is one `error:` line
# and exit 2, so a mistyped option never starts a run (or becomes the name of its folder).
#
#   . "$(dirname "$0")/args.sh"; check_study_args "$0" "--sync --knobs" "$@"
check_study_args() {
  local script=$1 allowed=" $2 " arg
  shift 2
  for arg in "$@"; do
    case "$arg" in
      -h|--help)
        awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$script"
        exit 0 ;;
      -*)
        case "$allowed" in
          *" $arg "*) ;;
          *) local takes="it takes:${allowed% }"
             [ -z "${allowed// /}" ] && takes="it takes no options"
             echo "error: $(basename "$script") has no option $arg ($takes; -h for help)" >&2
             exit 2 ;;
        esac ;;
    esac
  done
}
