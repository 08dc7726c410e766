#!/bin/sh
# pgferry-cnpg-promote.sh: `[switchover] promote_command` for a
# CloudNativePG cluster (docs/switchover.md, "Kubernetes (CloudNativePG)").
# An example: not tested in pgferry's CI (no Kubernetes there).
#
# pgferry runs it (sh -c) in the promote phase of a switchover, after it
# holds every session on PGFERRY_FROM and PGFERRY_TO has caught up. It runs
# `kubectl cnpg promote PGFERRY_CLUSTER PGFERRY_TO` and exits 0 only when the
# instance manager of PGFERRY_TO has finished making itself the primary.
#
# Why wait for that and not only for PGFERRY_TO to leave recovery:
# `kubectl cnpg promote` returns as soon as it has asked the operator for a
# switchover (it only patches the Cluster's status), and once the new
# primary is out of recovery its instance manager records itself as
# currentPrimary and then terminates every client connection on it
# (pg_terminate_backend of each client backend) before it logs "Finished
# setting myself as primary". Sessions pgferry moved there before that
# would be cut. `kubectl logs --since` is counted by the kubelet, so clock
# differences between this pod and the node do not matter.
#
# Exit status: 0 = promoted and settled; 1 = the request failed, or the log
# line did not appear within PGFERRY_CNPG_WAIT seconds (the operator may
# still complete the switchover: look at `kubectl cnpg status` first).
#
# Needs in pgferry's image: kubectl and the kubectl-cnpg plugin; RBAC for
# pgferry's ServiceAccount in the cluster's namespace: clusters get,
# clusters/status patch, pods get, pods/log get (cnpg-switchover-job.yaml).
# pgferry [[backend]] names must be the instance (Pod) names, e.g.
# pg-main-2, and the pgferry `cluster` the CNPG Cluster's name.
#
#   CNPG_NAMESPACE      namespace of the Cluster (default: this pod's own)
#   PGFERRY_CNPG_WAIT   seconds to wait (default 50; keep it below
#                       [switchover] promote_timeout)

prog=pgferry-cnpg-promote
log() {
    printf '%s %s: %s\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "$prog" "$*" >&2
}

to=${PGFERRY_TO:-}
cluster=${PGFERRY_CLUSTER:-}
ns=${CNPG_NAMESPACE:-}
if [ -z "$ns" ] && [ -r /var/run/secrets/kubernetes.io/serviceaccount/namespace ]; then
    ns=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace)
fi
wait_s=${PGFERRY_CNPG_WAIT:-50}
case $wait_s in
    '' | *[!0-9]*) wait_s=50 ;;
esac

if [ -z "$to" ] || [ -z "$cluster" ] || [ -z "$ns" ]; then
    log "PGFERRY_TO and PGFERRY_CLUSTER (set by pgferry) and CNPG_NAMESPACE must be known"
    exit 1
fi

log "promoting $to of cluster $cluster in namespace $ns"
start=$(date +%s)
if ! kubectl cnpg promote "$cluster" "$to" -n "$ns" >&2; then
    log "kubectl cnpg promote failed; if it timed out, the request may still have reached the operator: check kubectl cnpg status $cluster -n $ns"
    exit 1
fi

while :; do
    elapsed=$(($(date +%s) - start))
    if kubectl logs "pod/$to" -c postgres -n "$ns" --since="$((elapsed + 10))s" 2>/dev/null |
        grep -q 'Finished setting myself as primary'; then
        log "$to is the primary of $cluster and has dropped its old connections (after ${elapsed}s)"
        exit 0
    fi
    if [ "$elapsed" -ge "$wait_s" ]; then
        log "$to did not report itself primary within ${wait_s}s; check kubectl cnpg status $cluster -n $ns"
        exit 1
    fi
    sleep 1
done
