#!/usr/bin/env bash
# Generates cella's man page from its own help texts (help2man): the
# top-level --help, then a COMMANDS section with every command's --help.
# Usage: gen-man.sh CELLA_BINARY OUTPUT.1
set -euo pipefail
cella=$1
out=$2
include=$(mktemp)
trap 'rm -f "$include"' EXIT
{
  echo "[COMMANDS]"
  # The command names, from the help's own list (hidden ones are not listed).
  "$cella" --help | awk '/^Subcommands:/ {on = 1; next} on && NF {sub(/,$/, "", $1); print $1}' |
    while read -r sub; do
      echo ".SS cella $sub"
      echo ".nf"
      "$cella" "$sub" --help | sed 's/\\/\\\\/g; s/^\./\\\&./'
      echo ".fi"
    done
  echo "[SEE ALSO]"
  echo "The README and docs/ of the cella source tree."
} >"$include"
help2man --no-info --no-discard-stderr --name "run OCI images as microVM sandboxes" \
  --include "$include" --output "$out" "$cella"
