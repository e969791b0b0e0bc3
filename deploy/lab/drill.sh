#!/usr/bin/env bash
# A precopy drill over the lab: migrate, cut, watch a migration fail, heal, migrate again.
# Usage (root): deploy/lab/drill.sh [LAB_DIR]
set -euo pipefail
DIR=${1:-/run/godwit-lab}
G=(python3 -m agents.cli)
SRC=$DIR/source.sock
DST=$DIR/destination.sock

"${G[@]}" lab up --dir "$DIR"
trap '"${G[@]}" lab down --dir "$DIR"' EXIT
"${G[@]}" vm start vm1 --memory 128M --workload counter -a "$SRC"
"${G[@]}" migrate vm1 tls:10.77.0.2:4444 --wait --downtime-limit 20000 -a "$SRC"
"${G[@]}" vm verify vm1 --method counter -a "$DST"

"${G[@]}" vm start vm2 --memory 128M --workload counter -a "$SRC"
"${G[@]}" lab cut --dir "$DIR"
if "${G[@]}" migrate vm2 tls:10.77.0.2:4444 --wait --downtime-limit 20000 -a "$SRC"; then
    echo "drill: a migration over a cut link succeeded?" >&2
    exit 1
fi
"${G[@]}" lab heal --dir "$DIR"
"${G[@]}" migrate vm2 tls:10.77.0.2:4444 --wait --downtime-limit 20000 -a "$SRC"
"${G[@]}" vm verify vm2 --method counter -a "$DST"
echo "drill: ok"
