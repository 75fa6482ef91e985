#!/usr/bin/env bash
# Shared helpers of the launch scripts: argument errors, and running (or, with --dry-run, printing)
# a command. Sourced, not run.

DRY_RUN=0

die_usage() {  # die_usage "message": prints the message and the script's usage line, exits 2
  echo "error: $1" >&2
  echo "usage: $USAGE" >&2
  exit 2
}

need() {  # need NAME VALUE: refuses a missing required option
  [ -n "$2" ] || die_usage "missing --$1"
}

check_pattern() {  # check_pattern OPTION VALUE REGEX WHAT: refuses a value that does not match REGEX in full
  # Every value that reaches a remote command or a batch script passes through here first, so no
  # quoting mistake further down can turn an argument into a second command.
  if [[ "$2" == *$'\n'* || "$2" == *$'\r'* ]] || ! [[ "$2" =~ $3 ]]; then
    die_usage "--$1 must be $4 (got '$2')"
  fi
}

check_overrides() {  # check_overrides ARG...: only --config.FIELD=VALUE, with plain characters in VALUE
  local a
  for a in "$@"; do
    check_pattern "config override" "$a" '^--config\.[A-Za-z0-9_.]+=[][A-Za-z0-9_.,:/@%+=() -]*$' \
      "--config.FIELD=VALUE with letters, digits, spaces and _ . , : / @ % + = ( ) [ ] - in VALUE"
  done
}

check_name() {  # check_name OPTION VALUE: lowercase letters, digits and dashes, starting with a letter
  [[ "$2" =~ ^[a-z][a-z0-9-]{0,62}$ ]] || die_usage "--$1 must be lowercase letters, digits and dashes, starting with a letter (got '$2')"
}

quote_one() {  # one argument, single-quoted unless it is plainly safe
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote() {  # the arguments as one shell-quoted line, as a user would type it
  local out="" a
  for a in "$@"; do out+="$(quote_one "$a") "; done
  printf '%s' "${out% }"
}

run() {  # run CMD ARGS...: executes, or prints the exact command with --dry-run
  if [ "$DRY_RUN" -eq 1 ]; then
    quote "$@"
    echo
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}
