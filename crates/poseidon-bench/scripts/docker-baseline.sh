#!/usr/bin/env bash
# Starts and stops a private dockerd for poseidon-bench's Docker baseline.
#
#   docker-baseline.sh start DIR   start dockerd under DIR, import the image, start the exec container
#   docker-baseline.sh stop DIR    remove the containers, stop dockerd, undo its host changes
#
# dockerd gets its own data root, exec root, socket and pid file under DIR and is started without
# a bridge and without iptables (the baseline containers use --network none), so it should not
# touch the host's network; `stop` still deletes a docker0 link, restores the nftables ruleset and
# ip_forward as they were at `start`, and removes leftover docker cgroups. Exit code 3 from
# `start` means docker.io is not installed (the harness then reports the baseline as not run).
# The image holds only bash, python3 and coreutils with their libraries, taken from the host.
set -euo pipefail

IMAGE=poseidon-bench/host:1
EXEC_CONTAINER=poseidon-bench-exec
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

cmd=${1:?usage: $0 start|stop DIR}
dir=${2:?usage: $0 start|stop DIR}
sock="$dir/docker.sock"
docker_cli() { docker -H "unix://$sock" "$@"; }

save_host_state() {
    cat /proc/sys/net/ipv4/ip_forward >"$dir/ip_forward"
    if command -v nft >/dev/null; then nft list ruleset >"$dir/nft.ruleset"; fi
}

start_dockerd() {
    dockerd --data-root "$dir/data" --exec-root "$dir/exec" -H "unix://$sock" \
        --pidfile "$dir/dockerd.pid" --bridge none --iptables=false --ip-forward=false \
        --ip-masq=false >"$dir/dockerd.log" 2>&1 &
    for _ in $(seq 200); do
        if docker_cli info >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "dockerd did not answer within 20 s; its log:" >&2
    tail -n 20 "$dir/dockerd.log" >&2
    return 1
}

# Files of bash, python3 and a few coreutils plus every library they load, each with the target
# of its symlinks, spelled below /usr (bin, lib and lib64 are symlinks into /usr on Debian).
image_files() {
    local programs=(/usr/bin/bash /usr/bin/sh /usr/bin/dash /usr/bin/python3 /usr/bin/sleep
        /usr/bin/cat /usr/bin/echo /usr/bin/ls /usr/bin/env /usr/bin/true)
    local python
    python=$(readlink -f /usr/bin/python3)
    {
        printf '%s\n' "${programs[@]}" "$python"
        ldd "${programs[@]}" "$python" 2>/dev/null | grep -o '/[^ :]*'
        find "/usr/lib/$(basename "$python")" -path '*/test' -prune -o -print
    } | while read -r path; do
        printf '%s\n' "$path"
        readlink -f "$path"
    done | sed -E 's#^/(bin|lib|lib64|sbin)/#/usr/\1/#; s#^/##' | sort -u
}

import_image() {
    { image_files; printf '%s\n' bin lib lib64 sbin etc/passwd etc/group; } |
        tar -C / --no-recursion -T - -c 2>/dev/null |
        docker_cli import --change 'WORKDIR /tmp' - "$IMAGE" >/dev/null
}

start() {
    if ! command -v dockerd >/dev/null; then
        echo "docker.io not installed" >&2
        exit 3
    fi
    mkdir -p "$dir"
    save_host_state
    start_dockerd
    import_image
    docker_cli run -d --name "$EXEC_CONTAINER" --network none "$IMAGE" sleep infinity >/dev/null
}

stop_dockerd() {
    local pid
    pid=$(cat "$dir/dockerd.pid" 2>/dev/null || true)
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# containerd and its shims name our private directory on their command line; nothing else does.
kill_leftovers() {
    local pids
    pids=$(pgrep -f -- "$dir/" || true)
    [[ -n $pids ]] || return 0
    kill -TERM $pids 2>/dev/null || true
    sleep 1
    pids=$(pgrep -f -- "$dir/" || true)
    if [[ -n $pids ]]; then kill -KILL $pids 2>/dev/null || true; fi
}

restore_host_state() {
    if ip link show docker0 >/dev/null 2>&1; then ip link delete docker0 || true; fi
    if [[ -f $dir/nft.ruleset ]] && command -v nft >/dev/null; then
        nft flush ruleset && nft -f "$dir/nft.ruleset" || true
    fi
    if [[ -f $dir/ip_forward ]]; then cat "$dir/ip_forward" >/proc/sys/net/ipv4/ip_forward; fi
    find /sys/fs/cgroup -mindepth 1 -maxdepth 3 -type d -name docker 2>/dev/null |
        while read -r cgroup; do
            find "$cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || true
        done
}

unmount_below() {
    awk -v root="$dir" 'index($2, root) == 1 {print $2}' /proc/mounts | sort -r |
        while read -r mountpoint; do umount -l "$mountpoint" 2>/dev/null || true; done
}

stop() {
    if [[ -S $sock ]]; then
        docker_cli ps -aq | xargs -r docker -H "unix://$sock" rm -f >/dev/null 2>&1 || true
    fi
    stop_dockerd
    kill_leftovers
    unmount_below
    restore_host_state
    rm -rf "$dir/data" "$dir/exec"
}

case $cmd in
start) start ;;
stop) stop ;;
*)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac
