#!/usr/bin/env bash
# Runs a benchmark script on an older commit and on the working tree, alternately, in one session,
# so that both see the same machine state: `bash experiments/compare_commits.sh OLD_REV ROUNDS
# experiments/bench_moe_layer.py --threads 1`. Prints each run's report, labelled old/new.
set -euo pipefail
old_rev=$1; rounds=$2; shift 2
repo=$(git rev-parse --show-toplevel)
old_dir=$(mktemp -d)/old
git -C "$repo" worktree add -q --detach "$old_dir" "$old_rev"
trap 'git -C "$repo" worktree remove --force "$old_dir"' EXIT
# the installed layout (moe_lm.kernels, moe_lm.conf) for a source tree on PYTHONPATH
for tree in "$old_dir" "$repo"; do
  [ -e "$tree/moe_lm/kernels" ] || ln -s ../kernels "$tree/moe_lm/kernels"
  [ -e "$tree/moe_lm/conf" ] || ln -s ../conf "$tree/moe_lm/conf"
done
for round in $(seq "$rounds"); do
  for side in old new; do
    tree=$repo; [ "$side" = old ] && tree=$old_dir
    dirty=""; git -C "$tree" diff --quiet HEAD || dirty="+uncommitted changes"
    echo "===== round $round: $side ($(git -C "$tree" rev-parse --short HEAD)$dirty)"
    (cd "$tree" && PYTHONPATH="$tree" "${PYTHON:-python}" "$@")
  done
done
