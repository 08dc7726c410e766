#!/bin/sh
# pgferry-on-role-change.sh: Patroni `postgresql.callbacks.on_role_change`
# hook that tells pgferry about this node's new role (docs/switchover.md,
# "Patroni").
#
# Patroni runs it as   pgferry-on-role-change.sh on_role_change ROLE CLUSTER
# without waiting for it, after it has changed the role of this node (for a
# promotion: right after `pg_ctl promote`, usually before the promotion is
# finished). It is for unplanned failovers. Planned switchovers are started
# through pgferry (`pgferry ctl switchover`), never from here: when this runs,
# the old primary is already gone.
#
# What it does, for every pgferry in PGFERRY_ADMIN_URL:
#   ROLE primary (master before Patroni 4, promoted): if pgferry has this
#     node `drained` or `draining` (an operator took it out earlier), POST
#     /v1/backends/NAME/activate, since it is now the primary that read-write
#     sessions need; then wait up to PGFERRY_ROLE_WAIT seconds until pgferry's
#     health check reports it as `primary`, and log pgferry's view of all
#     backends.
#   any other ROLE (replica, standby_leader, demoted): log pgferry's view of
#     this node. pgferry's health check finds roles by itself; nothing to do.
# It never fails Patroni: errors are logged on stderr, the exit status is 0.
#
# Settings: the environment, or KEY=value lines in the file PGFERRY_CALLBACK_ENV
# (default /etc/pgferry/on-role-change.env, read when it exists; keep it
# readable only by the user Patroni runs as, it holds the token):
#   PGFERRY_ADMIN_URL     admin API base URL(s), space-separated
#                         (default http://127.0.0.1:9930)
#   PGFERRY_ADMIN_TOKEN   bearer token ([proxy] admin_token), if set there
#   PGFERRY_BACKEND_NAME  this node's [[backend]] name (default: uname -n)
#   PGFERRY_ROLE_WAIT     seconds to wait for pgferry to see the promotion
#                         (default 30; 0 to skip the wait)
#   PGFERRY_CURL_TIMEOUT  seconds per request (default 10)

prog=pgferry-on-role-change

log() {
    printf '%s %s: %s\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "$prog" "$*" >&2
}

# The env file is read, not sourced: only the keys below are taken from it
# (KEY=value, optionally quoted, # comments), and the environment wins.
load_env() {
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line#"${line%%[![:space:]]*}"}
        line=${line#export }
        case $line in '' | '#'*) continue ;; esac
        key=${line%%=*}
        value=${line#*=}
        [ "$key" != "$line" ] || continue
        case $value in
            \"*\") value=${value#\"}; value=${value%\"} ;;
            \'*\') value=${value#\'}; value=${value%\'} ;;
        esac
        case $key in
            PGFERRY_ADMIN_URL) : "${PGFERRY_ADMIN_URL:=$value}" ;;
            PGFERRY_ADMIN_TOKEN) : "${PGFERRY_ADMIN_TOKEN:=$value}" ;;
            PGFERRY_BACKEND_NAME) : "${PGFERRY_BACKEND_NAME:=$value}" ;;
            PGFERRY_ROLE_WAIT) : "${PGFERRY_ROLE_WAIT:=$value}" ;;
            PGFERRY_CURL_TIMEOUT) : "${PGFERRY_CURL_TIMEOUT:=$value}" ;;
            *) log "$env_file: ignoring unknown key '$key'" ;;
        esac
    done <"$1"
}

env_file=${PGFERRY_CALLBACK_ENV:-/etc/pgferry/on-role-change.env}
if [ -r "$env_file" ] && [ -f "$env_file" ]; then
    load_env "$env_file"
fi

action=${1:-}
role=${2:-}
scope=${3:-}
admin_urls=${PGFERRY_ADMIN_URL:-http://127.0.0.1:9930}
name=${PGFERRY_BACKEND_NAME:-$(uname -n)}
role_wait=${PGFERRY_ROLE_WAIT:-30}
curl_timeout=${PGFERRY_CURL_TIMEOUT:-10}
token=${PGFERRY_ADMIN_TOKEN:-}

if [ "$action" != on_role_change ]; then
    log "called for '$action', not on_role_change; nothing to do"
    exit 0
fi

case $name in
    '' | *[!A-Za-z0-9._-]*)
        log "backend name '$name' is empty or needs URL escaping; set PGFERRY_BACKEND_NAME"
        exit 0
        ;;
esac
case $role_wait in
    '' | *[!0-9]*) role_wait=30 ;;
esac
case $curl_timeout in
    '' | *[!0-9]* | 0) curl_timeout=10 ;;
esac
nl='
'
case $token in
    *'"'* | *\\* | *"$nl"*)
        log "PGFERRY_ADMIN_TOKEN contains a quote, a backslash or a newline; not sending it"
        token=
        ;;
esac
if ! command -v curl >/dev/null 2>&1; then
    log "curl not found; cannot reach pgferry"
    exit 0
fi

# api METHOD URL: sets api_code (HTTP status, 000 when there was no answer)
# and api_body. The token goes to curl on stdin (-K -), never on the
# command line, where other local users could read it in the process list.
api() {
    api_conf=
    [ -z "$token" ] || api_conf="header = \"Authorization: Bearer $token\""
    [ "$1" != POST ] || api_conf="$api_conf
header = \"Content-Length: 0\""
    api_resp=$(printf '%s\n' "$api_conf" |
        curl -sS -K - --connect-timeout 3 --max-time "$curl_timeout" \
            -X "$1" -w '%{http_code}' "$2")
    api_code=${api_resp#"${api_resp%???}"}
    api_body=${api_resp%???}
    case $api_code in
        [0-9][0-9][0-9]) ;;
        *) api_code=000 ;;
    esac
}

# field JSON KEY: the value of KEY in a flat JSON object (strings unquoted).
field() {
    printf '%s' "$1" | tr -d '\n' | awk -v key="$2" '
        {
            if (!match($0, "\"" key "\"[ \t]*:[ \t]*")) { print "?"; exit }
            s = substr($0, RSTART + RLENGTH)
            if (substr(s, 1, 1) == "\"") {
                s = substr(s, 2); print substr(s, 1, index(s, "\"") - 1)
            } else {
                match(s, /^[^,}]*/); v = substr(s, 1, RLENGTH); gsub(/[ \t]/, "", v); print v
            }
        }'
}

# summary JSON_ARRAY: one line per backend object.
summary() {
    printf '%s' "$1" | tr -d '\n' | awk '
        function f(rec, key,   s, v) {
            if (!match(rec, "\"" key "\"[ \t]*:[ \t]*")) return "?"
            s = substr(rec, RSTART + RLENGTH)
            if (substr(s, 1, 1) == "\"") { s = substr(s, 2); return substr(s, 1, index(s, "\"") - 1) }
            match(s, /^[^,}]*/); v = substr(s, 1, RLENGTH); gsub(/[ \t]/, "", v); return v
        }
        BEGIN { RS = "}" }
        /"name"/ {
            printf "  %s cluster=%s role=%s state=%s healthy=%s sessions=%s\n",
                f($0, "name"), f($0, "cluster"), f($0, "role"), f($0, "state"),
                f($0, "healthy"), f($0, "sessions")
        }'
}

describe() {
    printf 'role=%s state=%s healthy=%s sessions=%s' \
        "$(field "$1" role)" "$(field "$1" state)" "$(field "$1" healthy)" "$(field "$1" sessions)"
}

on_primary() {
    base=$1
    api GET "$base/v1/backends/$name"
    if [ "$api_code" != 200 ]; then
        log "$base: GET /v1/backends/$name answered $api_code ${api_body:-(no answer)}"
        return
    fi
    log "$base sees $name: $(describe "$api_body")"

    case $(field "$api_body" state) in
        drained | draining)
            api POST "$base/v1/backends/$name/activate"
            if [ "$api_code" = 200 ]; then
                log "$base: activated $name: $(describe "$api_body")"
            else
                log "$base: POST /v1/backends/$name/activate answered $api_code ${api_body:-(no answer)}"
            fi
            ;;
    esac

    waited=0
    while [ "$(field "$api_body" role)" != primary ] && [ "$waited" -lt "$role_wait" ]; do
        sleep 1
        waited=$((waited + 1))
        api GET "$base/v1/backends/$name"
        [ "$api_code" = 200 ] || api_body=
    done
    if [ "$(field "$api_body" role)" = primary ]; then
        log "$base sees $name as primary (after ${waited}s)"
    elif [ "$role_wait" -gt 0 ]; then
        log "$base does not see $name as primary after ${role_wait}s: check its [backend_admin] login to $name"
    fi

    api GET "$base/v1/backends"
    if [ "$api_code" = 200 ]; then
        log "$base backends:"
        summary "$api_body" >&2
    else
        log "$base: GET /v1/backends answered $api_code ${api_body:-(no answer)}"
    fi
}

on_other() {
    base=$1
    api GET "$base/v1/backends/$name"
    if [ "$api_code" = 200 ]; then
        log "$base sees $name: $(describe "$api_body") (its health check follows the role change by itself)"
    else
        log "$base: GET /v1/backends/$name answered $api_code ${api_body:-(no answer)}"
    fi
}

log "$name of Patroni cluster '$scope' is now '$role'"
for base in $admin_urls; do
    base=${base%/}
    case $role in
        primary | master | promoted) on_primary "$base" ;;
        *) on_other "$base" ;;
    esac
done
exit 0
