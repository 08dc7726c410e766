#!/usr/bin/env bash
# pgbench macro benchmark: direct PostgreSQL vs pgferry vs PgBouncer (session
# mode), same cluster, same machine, same run, alternating order.
#
#   bash benches/pgbench.sh                 # full run (~6.5 min with defaults)
#   SMOKE=1 bash benches/pgbench.sh         # 2 s per target, fails on errors
#
# Environment (defaults in brackets):
#   DURATION [30]   seconds per pgbench run
#   CLIENTS  [16]   pgbench -c; a list ("16 64 256") runs every mode at each
#   THREADS  [2]    pgbench -j
#   SCALE    [10]   pgbench -i -s
#   MODES    ["simple extended"]  pgbench -M values
#   SCRIPT   [select-only]  pgbench -b builtin: select-only (-S) or tpcb-like
#   ROUNDS   [2]    runs per (mode, target); odd rounds go direct, pgferry,
#                   pgbouncer; even rounds the reverse
#   WARMUP   [5]    seconds of unrecorded select-only load per target first
#                   (0 = none)
#   SMOKE    [0]    1 = DURATION=2 ROUNDS=1 SCALE=1 WARMUP=0
#   PGFERRY_BIN     use this binary instead of `cargo build --release`
#   SESSION_THREADS pgferry's `[proxy] session_threads` (unset: not written,
#                   so older builds run too; 0: sessions on the shared
#                   multi-threaded runtime; N: N single-threaded session
#                   threads)
#   PG_BINDIR       PostgreSQL server binaries (else pg_config --bindir,
#                   else the newest /usr/lib/postgresql/*/bin)
#   PGBOUNCER       pgbouncer binary (else from PATH or /usr/sbin)
#   OUT             also write the report (markdown) to this file
#   KEEP_WORKDIR    1 = keep the temp dir (logs, configs) after exit
#   PGBENCH_CPUS, PG_CPUS, PROXY_CPUS
#                   CPU lists (taskset -c syntax, e.g. "0-3") for pgbench,
#                   for PostgreSQL (the postmaster; its server processes
#                   inherit it) and for both proxies; unset = anywhere.
#                   On a machine with 8+ cores this measures a proxy's own
#                   cost and its scaling with cores apart from PostgreSQL's
#                   (PgBouncer is one thread; pgferry runs a worker per CPU
#                   it may use).
#
# Exits non-zero if any pgbench run fails, reports failed transactions or
# reports zero TPS. The report also gives CPU (user + system) per
# transaction over each target's runs: the proxy's own (/proc/<pid>/stat)
# and the whole machine's (/proc/stat), which also carries the kernel work
# a proxy causes in other processes' context. (PostgreSQL's own is not
# given: /proc shows a live server process's CPU only partly until it
# exits, when its whole life lands in the postmaster's reaped total, so a
# per-run figure would be skewed by which connections closed when.)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

SMOKE=${SMOKE:-0}
if [[ $SMOKE == 1 ]]; then
    DURATION=${DURATION:-2}
    ROUNDS=${ROUNDS:-1}
    SCALE=${SCALE:-1}
    WARMUP=${WARMUP:-0}
fi
DURATION=${DURATION:-30}
CLIENTS=${CLIENTS:-16}
THREADS=${THREADS:-2}
SCALE=${SCALE:-10}
MODES=${MODES:-simple extended}
SCRIPT=${SCRIPT:-select-only}
ROUNDS=${ROUNDS:-2}
WARMUP=${WARMUP:-5}
TARGETS=(direct pgferry pgbouncer)
MAX_CLIENTS=0
for c in $CLIENTS; do
    [[ $c =~ ^[0-9]+$ && $c -gt 0 ]] || { echo "CLIENTS: '$c' is not a positive number" >&2; exit 2; }
    ((c > MAX_CLIENTS)) && MAX_CLIENTS=$c
done
((MAX_CLIENTS > 0)) || { echo "CLIENTS is empty" >&2; exit 2; }
# Command prefixes that pin a program (and its children) to a CPU list.
ON_PGBENCH_CPUS=() ON_PG_CPUS=() ON_PROXY_CPUS=()
for v in PGBENCH_CPUS PG_CPUS PROXY_CPUS; do
    if [[ -n ${!v:-} ]]; then
        command -v taskset >/dev/null || { echo "$v needs taskset (apt-get install -y util-linux)" >&2; exit 2; }
        taskset -c "${!v}" true 2>/dev/null || { echo "$v=${!v}: not a usable CPU list here" >&2; exit 2; }
        declare -n prefix="ON_$v"
        prefix=(taskset -c "${!v}")
        unset -n prefix
    fi
done

log() { printf '[pgbench.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# ---------------------------------------------------------------- binaries

find_pg_bindir() {
    local d
    if [[ -n ${PG_BINDIR:-} ]]; then
        echo "$PG_BINDIR"
        return
    fi
    if d=$(pg_config --bindir 2>/dev/null) && [[ -x $d/initdb ]]; then
        echo "$d"
        return
    fi
    d=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null |
        sort -V | tail -n 1)
    [[ -n $d ]] || return 1
    echo "$d"
}

PG_BINDIR=$(find_pg_bindir) || die "no PostgreSQL server binaries (apt-get install -y postgresql)"
for b in initdb pg_ctl postgres psql pgbench; do
    [[ -x $PG_BINDIR/$b ]] || die "$PG_BINDIR/$b not found"
done
PSQL=$PG_BINDIR/psql
PGBENCH=$PG_BINDIR/pgbench

PGBOUNCER=${PGBOUNCER:-$(command -v pgbouncer 2>/dev/null || true)}
if [[ -z $PGBOUNCER && -x /usr/sbin/pgbouncer ]]; then
    PGBOUNCER=/usr/sbin/pgbouncer
fi
if [[ -z $PGBOUNCER || ! -x $PGBOUNCER ]]; then
    echo "pgbouncer not found; install it with:" >&2
    echo "  apt-get install -y pgbouncer" >&2
    exit 1
fi

if [[ -n ${PGFERRY_BIN:-} ]]; then
    [[ -x $PGFERRY_BIN ]] || die "PGFERRY_BIN=$PGFERRY_BIN is not executable"
else
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --bin pgferry) >&2
    PGFERRY_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/pgferry
    [[ $PGFERRY_BIN == /* ]] || PGFERRY_BIN=$ROOT/$PGFERRY_BIN
fi
[[ -x $PGFERRY_BIN ]] || die "$PGFERRY_BIN not found"

# PostgreSQL and PgBouncer refuse to run as root: use the postgres user.
if [[ $EUID -eq 0 ]]; then
    RUN_USER=${RUN_USER:-postgres}
    id "$RUN_USER" >/dev/null 2>&1 || die "running as root needs a '$RUN_USER' user"
    as_user() { setpriv --reuid="$RUN_USER" --regid="$(id -g "$RUN_USER")" --init-groups -- "$@"; }
    # For background jobs: replaces the subshell, so `$!` is the program.
    exec_as_user() { exec setpriv --reuid="$RUN_USER" --regid="$(id -g "$RUN_USER")" --init-groups -- "$@"; }
else
    RUN_USER=$(id -un)
    as_user() { "$@"; }
    exec_as_user() { exec "$@"; }
fi

# ----------------------------------------------------------------- cleanup

WORK=""
PG_STARTED=0
FERRY_PID=""
BOUNCER_PID=""
FAILED_RUN=0

# TERM, then KILL after ~10 s; only for processes this script started.
stop_pid() {
    local pid=$1 i
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    stop_pid "$FERRY_PID"
    stop_pid "$BOUNCER_PID"
    if [[ $PG_STARTED == 1 ]]; then
        as_user "$PG_BINDIR/pg_ctl" -D "$WORK/pgdata" -m fast -w -t 30 stop >/dev/null 2>&1 ||
            as_user "$PG_BINDIR/pg_ctl" -D "$WORK/pgdata" -m immediate -w stop >/dev/null 2>&1
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $rc -ne 0 ]]; then
            for f in "$WORK"/postgres.log "$WORK"/pgferry.log "$WORK"/pgbouncer.log; do
                [[ -s $f ]] || continue
                log "last lines of $f:"
                tail -n 20 "$f" >&2
            done
        fi
        if [[ ${KEEP_WORKDIR:-0} == 1 ]]; then
            log "kept $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------- setup

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pgferry-bench.XXXXXX")
chmod 755 "$WORK"
mkdir -p "$WORK/run"
[[ $EUID -eq 0 ]] && chown -R "$RUN_USER:" "$WORK"

USED_PORTS=" "
# free_port VAR: a TCP port nothing listens on (and not handed out before),
# below the kernel's ephemeral range, so that no outgoing connection (of a
# test running alongside, say) can take it between now and the bind.
EPHEMERAL_LOW=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
((EPHEMERAL_LOW > 12000)) || EPHEMERAL_LOW=32768
free_port() {
    local p i
    for ((i = 0; i < 500; i++)); do
        p=$((10000 + RANDOM % (EPHEMERAL_LOW - 10000)))
        [[ $USED_PORTS == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS+="$p "
            printf -v "$1" '%s' "$p"
            return 0
        fi
    done
    die "no free port found"
}
free_port PG_PORT
free_port FERRY_PORT
free_port BOUNCER_PORT

export PGPASSWORD=bench PGSSLMODE=disable PGCONNECT_TIMEOUT=5
unset PGHOST PGPORT PGUSER PGDATABASE PGSERVICE PGOPTIONS

# psql_select PORT: `select 1` as bench over TCP.
psql_select() {
    "$PSQL" -X -q -At -h 127.0.0.1 -p "$1" -U bench -d bench -c 'select 1' >/dev/null 2>&1
}

# wait_ready NAME PORT [PID]: poll until `select 1` works (bounded).
wait_ready() {
    local name=$1 port=$2 pid=${3:-} i
    for ((i = 0; i < 150; i++)); do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            die "$name exited during startup"
        fi
        psql_select "$port" && return 0
        sleep 0.2
    done
    die "$name did not accept connections on port $port within 30 s"
}

log "PostgreSQL from $PG_BINDIR, port $PG_PORT; workdir $WORK"
as_user "$PG_BINDIR/initdb" -D "$WORK/pgdata" -U postgres -E UTF8 --no-sync \
    --auth-local=trust --auth-host=scram-sha-256 >"$WORK/initdb.log" 2>&1 ||
    { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
# fsync/synchronous_commit/full_page_writes off: the workload is read-only
# (pgbench -S) and the setting is the same for all three targets.
# max_connections: PgBouncer keeps its server connections open after its
# clients leave (server_idle_timeout), so a direct run at the largest
# client count needs room beside them.
cat >>"$WORK/pgdata/postgresql.conf" <<EOF

# benches/pgbench.sh
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK/run'
max_connections = $((MAX_CLIENTS * 2 + 40))
shared_buffers = 128MB
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = 'scram-sha-256'
EOF
as_user "${ON_PG_CPUS[@]}" "$PG_BINDIR/pg_ctl" -D "$WORK/pgdata" -l "$WORK/postgres.log" -w -t 60 start >/dev/null ||
    die "PostgreSQL did not start"
PG_STARTED=1
as_user "$PSQL" -X -q -h "$WORK/run" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    -c "CREATE ROLE bench LOGIN PASSWORD 'bench'" \
    -c "CREATE DATABASE bench OWNER bench" >/dev/null
wait_ready PostgreSQL "$PG_PORT"

# pgferry: plaintext TCP (no [tls]), one backend, plaintext userlist.
printf '"bench" "bench"\n' >"$WORK/pgferry-users.txt"
cat >"$WORK/pgferry.toml" <<EOF
[proxy]
listen = "127.0.0.1:$FERRY_PORT"
shutdown_timeout = "1s"
max_client_connections = $((MAX_CLIENTS * 2 + 20))
${SESSION_THREADS:+session_threads = $SESSION_THREADS}

[auth]
userlist = "pgferry-users.txt"

[[backend]]
name = "pg1"
address = "127.0.0.1:$PG_PORT"
EOF
RUST_LOG=${RUST_LOG:-info} "${ON_PROXY_CPUS[@]}" "$PGFERRY_BIN" run --config "$WORK/pgferry.toml" \
    >"$WORK/pgferry.log" 2>&1 &
FERRY_PID=$!

# PgBouncer: session pooling, SCRAM on both sides (plaintext auth_file so
# it can log in to PostgreSQL with SCRAM too).
printf '"bench" "bench"\n' >"$WORK/pgbouncer-users.txt"
cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/pgbouncer-users.txt
pool_mode = session
default_pool_size = $((MAX_CLIENTS + 4))
max_client_conn = $((MAX_CLIENTS * 2 + 20))
ignore_startup_parameters = extra_float_digits
EOF
[[ $EUID -eq 0 ]] && chown "$RUN_USER:" "$WORK"/pgbouncer*
(exec_as_user "${ON_PROXY_CPUS[@]}" "$PGBOUNCER" "$WORK/pgbouncer.ini") >"$WORK/pgbouncer.log" 2>&1 &
BOUNCER_PID=$!

wait_ready pgferry "$FERRY_PORT" "$FERRY_PID"
wait_ready PgBouncer "$BOUNCER_PORT" "$BOUNCER_PID"

log "pgbench -i -s $SCALE (direct)"
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U bench bench >"$WORK/pgbench-init.log" 2>&1 ||
    { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }

port_of() {
    case $1 in
    direct) echo "$PG_PORT" ;;
    pgferry) echo "$FERRY_PORT" ;;
    pgbouncer) echo "$BOUNCER_PORT" ;;
    esac
}

# ---------------------------------------------------------------- the runs

declare -A TPS FAILED CPU_TICKS HOST_TICKS TX
# proc_ticks PID: user + system CPU of a process so far, in USER_HZ (1/100 s).
proc_ticks() {
    local rest
    [[ -n $1 && -r /proc/$1/stat ]] || { echo 0; return; }
    rest=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    awk '{ print $12 + $13 }' <<<"$rest"
}
# host_ticks: busy CPU of the whole machine so far (/proc/stat, all CPUs:
# everything but idle and iowait), in USER_HZ.
host_ticks() {
    awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat
}
pid_of() {
    case $1 in
    pgferry) echo "$FERRY_PID" ;;
    pgbouncer) echo "$BOUNCER_PID" ;;
    *) echo "" ;;
    esac
}
# run_one TARGET MODE SECONDS LOGFILE [SCRIPT] [CLIENTS]: sets RUN_TPS,
# RUN_FAILED, RUN_RC, RUN_TX (transactions), and the CPU ticks spent
# meanwhile by the proxy (RUN_CPU) and the machine (RUN_HOST).
run_one() {
    local target=$1 mode=$2 secs=$3 out=$4 script=${5:-$SCRIPT} clients=${6:-$MAX_CLIENTS}
    local before host_before
    RUN_RC=0
    before=$(proc_ticks "$(pid_of "$target")")
    host_before=$(host_ticks)
    "${ON_PGBENCH_CPUS[@]}" "$PGBENCH" -b "$script" -n -c "$clients" -j "$THREADS" -T "$secs" -M "$mode" \
        -h 127.0.0.1 -p "$(port_of "$target")" -U bench bench >"$out" 2>&1 || RUN_RC=$?
    RUN_CPU=$(($(proc_ticks "$(pid_of "$target")") - before))
    RUN_HOST=$(($(host_ticks) - host_before))
    RUN_TPS=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' "$out" | head -n 1)
    RUN_FAILED=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out" | head -n 1)
    RUN_TX=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out" | head -n 1)
    RUN_TPS=${RUN_TPS:-0}
    RUN_FAILED=${RUN_FAILED:-unknown}
    RUN_TX=${RUN_TX:-0}
}

if ((WARMUP > 0)); then
    for target in "${TARGETS[@]}"; do
        log "warm-up: $target, ${WARMUP}s"
        run_one "$target" simple "$WARMUP" "$WORK/pgbench-warmup-$target.log" select-only
    done
fi

for clients in $CLIENTS; do
    for mode in $MODES; do
        for ((round = 1; round <= ROUNDS; round++)); do
            if ((round % 2 == 1)); then
                order=(direct pgferry pgbouncer)
            else
                order=(pgbouncer pgferry direct)
            fi
            for target in "${order[@]}"; do
                out="$WORK/pgbench-c$clients-$mode-$target-r$round.log"
                run_one "$target" "$mode" "$DURATION" "$out" "$SCRIPT" "$clients"
                log "-c $clients $mode round $round $target: tps=$RUN_TPS failed=$RUN_FAILED rc=$RUN_RC"
                if [[ $RUN_RC -ne 0 || $RUN_FAILED != 0 ]] || awk -v t="$RUN_TPS" 'BEGIN { exit !(t <= 0) }'; then
                    FAILED_RUN=1
                    log "pgbench output ($out):"
                    tail -n 25 "$out" >&2
                fi
                k="$clients,$mode,$target"
                TPS[$k]+="$RUN_TPS "
                CPU_TICKS[$k]=$((${CPU_TICKS[$k]:-0} + RUN_CPU))
                HOST_TICKS[$k]=$((${HOST_TICKS[$k]:-0} + RUN_HOST))
                TX[$k]=$((${TX[$k]:-0} + RUN_TX))
                if [[ $RUN_FAILED =~ ^[0-9]+$ ]]; then
                    FAILED[$k]=$((${FAILED[$k]:-0} + RUN_FAILED))
                else
                    FAILED[$k]=unknown
                fi
            done
        done
    done
done

# ------------------------------------------------------------------ report

commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
report=$WORK/report.md
{
    echo "### pgbench -b $SCRIPT: direct vs pgferry vs PgBouncer"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- machine: $(nproc) CPUs, kernel $(uname -r)"
    echo "- pgferry: commit $commit ($PGFERRY_BIN), session_threads = ${SESSION_THREADS:-default}"
    echo "- $("$PG_BINDIR/postgres" --version); $("$PGBENCH" --version); $("$PGBOUNCER" --version | head -n 1) (pool_mode=session)"
    echo "- pgbench -b $SCRIPT -n -c <clients> -j $THREADS -T $DURATION -M <mode>, scale $SCALE, $ROUNDS round(s), warm-up ${WARMUP}s per target"
    echo "- CPU sets: pgbench ${PGBENCH_CPUS:-any}, PostgreSQL ${PG_CPUS:-any}, proxies ${PROXY_CPUS:-any}"
    echo "- order: odd rounds direct, pgferry, pgbouncer; even rounds pgbouncer, pgferry, direct"
    echo "- CPU µs/tx: user + system over the target's runs; proxy = its process, machine = /proc/stat busy time of all CPUs"
    echo
    header="| clients | mode | target |"
    rule="|---:|---|---|"
    for ((round = 1; round <= ROUNDS; round++)); do
        header+=" TPS r$round |"
        rule+="---:|"
    done
    echo "$header mean TPS | vs direct | vs PgBouncer | failed tx | proxy CPU µs/tx | machine CPU µs/tx |"
    echo "$rule---:|---:|---:|---:|---:|---:|"
    for clients in $CLIENTS; do
        for mode in $MODES; do
            direct_tps=${TPS[$clients,$mode,direct]}
            bouncer_tps=${TPS[$clients,$mode,pgbouncer]}
            for target in "${TARGETS[@]}"; do
                k="$clients,$mode,$target"
                awk -v clients="$clients" -v mode="$mode" -v target="$target" -v tps="${TPS[$k]}" \
                    -v d="$direct_tps" -v b="$bouncer_tps" -v failed="${FAILED[$k]}" \
                    -v ticks="${CPU_TICKS[$k]:-0}" -v host="${HOST_TICKS[$k]:-0}" \
                    -v tx="${TX[$k]:-0}" '
                    function mean(s,   a, n, i, t) { n = split(s, a, " "); t = 0
                        for (i = 1; i <= n; i++) t += a[i]; return n ? t / n : 0 }
                    function ratio(x, y) { return y > 0 ? sprintf("%.3f", x / y) : "n/a" }
                    function per_tx(t) { return tx > 0 ? sprintf(" %.1f |", t * 10000 / tx) : " - |" }
                    BEGIN {
                        n = split(tps, a, " "); line = "| " clients " | " mode " | " target " |"
                        for (i = 1; i <= n; i++) line = line sprintf(" %.0f |", a[i])
                        m = mean(tps)
                        line = line sprintf(" %.0f | %s | %s | %s |", m, ratio(m, mean(d)), ratio(m, mean(b)), failed)
                        line = line (target == "direct" ? " - |" : per_tx(ticks)) per_tx(host)
                        print line
                    }'
            done
        done
    done
} >"$report"
cat "$report"
if [[ -n ${OUT:-} ]]; then
    cp "$report" "$OUT"
fi

if [[ $FAILED_RUN == 1 ]]; then
    log "FAILED: a pgbench run failed, reported failed transactions or zero TPS"
    exit 1
fi
log "done"
