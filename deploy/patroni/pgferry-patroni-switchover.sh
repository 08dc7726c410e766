#!/bin/sh
# pgferry-patroni-switchover.sh: `[switchover] promote_command` for a Patroni
# cluster (docs/switchover.md, "Patroni").
#
# pgferry runs it (sh -c) in the promote phase of `pgferry ctl switchover
# FROM TO`, after it holds every session on FROM and TO has caught up, with
# PGFERRY_FROM, PGFERRY_TO, PGFERRY_CLUSTER (and the *_ADDRESS variables) set.
# It asks Patroni for a switchover from PGFERRY_FROM to PGFERRY_TO and exits 0
# only once Patroni reports PGFERRY_TO as the running leader.
#
# Why a script and not `patronictl switchover` alone: patronictl exits 0 even
# when Patroni answers "Switchover failed" (it only prints it), and it
# returns as soon as the leader key moved, possibly before PostgreSQL on TO
# has left recovery (pgferry checks that as well).
#
# Exit status: 0 = TO is the leader; 1 = Patroni refused or failed, or TO did
# not become the leader within PGFERRY_PATRONI_WAIT seconds. Patroni may
# still complete a switchover it answered "result unknown" to; on exit 1
# look at `patronictl list` before anything else.
#
# Needs: patronictl (Patroni 3.0 or newer: --leader) on the pgferry host with
# a config that reaches the DCS and, if set, Patroni's REST API credentials
# (ctl: section). pgferry [[backend]] names must be the Patroni member names
# (`name` in patroni.yml) and the pgferry `cluster` the Patroni `scope`.
#
#   PATRONICTL_CONFIG_FILE  patronictl config (patronictl's own variable;
#                           default here /etc/patroni/patronictl.yml)
#   PGFERRY_PATRONI_WAIT    seconds to wait for TO to lead (default 50; keep
#                           it below [switchover] promote_timeout)

prog=pgferry-patroni-switchover
log() {
    printf '%s %s: %s\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "$prog" "$*" >&2
}

from=${PGFERRY_FROM:-}
to=${PGFERRY_TO:-}
scope=${PGFERRY_CLUSTER:-}
config=${PATRONICTL_CONFIG_FILE:-/etc/patroni/patronictl.yml}
wait_s=${PGFERRY_PATRONI_WAIT:-50}
case $wait_s in
    '' | *[!0-9]*) wait_s=50 ;;
esac

if [ -z "$from" ] || [ -z "$to" ] || [ -z "$scope" ]; then
    log "PGFERRY_FROM, PGFERRY_TO and PGFERRY_CLUSTER must be set (pgferry sets them)"
    exit 1
fi

# leader_state: prints "Role State" of member $to, e.g. "Leader running".
leader_state() {
    patronictl -c "$config" list "$scope" -f tsv 2>/dev/null | awk -F '\t' -v m="$to" '
        NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
        $col["Member"] == m { print $col["Role"], $col["State"]; exit }'
}

log "asking Patroni (cluster $scope) to switch over from $from to $to"
out=$(patronictl -c "$config" switchover "$scope" --leader "$from" --candidate "$to" --force 2>&1)
rc=$?
printf '%s\n' "$out" >&2
if [ "$rc" -ne 0 ]; then
    log "patronictl exited $rc: Patroni did not start the switchover"
    exit 1
fi
case $out in
    *"witchover failed"*)
        log "Patroni says the switchover failed; current state of $to: $(leader_state)"
        exit 1
        ;;
esac

waited=0
while :; do
    state=$(leader_state)
    if [ "$state" = "Leader running" ]; then
        log "$to leads cluster $scope (after ${waited}s)"
        exit 0
    fi
    if [ "$waited" -ge "$wait_s" ]; then
        log "$to is not the running leader after ${wait_s}s (now: ${state:-unknown}); check patronictl list"
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done
