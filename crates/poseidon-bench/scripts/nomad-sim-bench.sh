#!/usr/bin/env bash
# Runs poseidon-bench against Poseidon's Nomad backend, over the Nomad simulator (nomad-sim,
# whose allocations are sandboxes of our runtime), and cleans up after itself.
#
#   crates/poseidon-bench/scripts/nomad-sim-bench.sh TARGET_DIR [poseidon-bench arguments]
#
# TARGET_DIR holds release builds of poseidon, poseidon-bench and nomad-sim:
#   cargo build --release -p poseidon -p poseidon-bench -p nomad-sim
# Needs root (the simulator creates sandboxes). Memory and CPU of the service are not measured
# (the harness only measures a service it spawns itself).
set -euo pipefail
bin=${1:?usage: nomad-sim-bench.sh TARGET_DIR [poseidon-bench arguments]}
shift
dir=$(mktemp -d -t poseidon-nomad-bench-XXXXXX)
# The sandboxes must traverse it to their state (see the simulator's --state-dir).
chmod 0711 "$dir"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sim_port=$(free_port)
api_port=$(free_port)
token=$(python3 -c 'import uuid; print(uuid.uuid4().hex)')
pids=()
stop() {
    # The service first (it keeps Nomad's runners, as it does across restarts), then the
    # simulator, which kills every allocation's sandbox on SIGTERM.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill -TERM "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
    [ "${KEEP:-}" ] && echo "kept $dir" || rm -rf "$dir"
}
trap stop EXIT
"$bin/nomad-sim" --listen "127.0.0.1:$sim_port" --state-dir "$dir/sim" \
    --cgroup-name "nomad-bench-$$" >"$dir/sim.log" 2>&1 &
pids+=($!)
cat >"$dir/poseidon.yaml" <<YAML
server:
  address: 127.0.0.1
  port: $api_port
  token: $token
statedir: $dir/poseidon
nomad:
  enabled: true
  address: 127.0.0.1
  port: $sim_port
logger:
  level: warn
YAML
"$bin/poseidon" serve --config "$dir/poseidon.yaml" >"$dir/poseidon.log" 2>&1 &
pids+=($!)
python3 - "$api_port" "$token" <<'PY'
import sys, time, urllib.request
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/api/v1/health",
                                 headers={"Poseidon-Token": sys.argv[2]})
for _ in range(100):
    try:
        urllib.request.urlopen(request, timeout=1)
        break
    except OSError:
        time.sleep(0.1)
PY
"$bin/poseidon-bench" --url "http://127.0.0.1:$api_port" --token "$token" "$@"
