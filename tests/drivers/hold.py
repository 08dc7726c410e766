"""psycopg 3 session held through a pgferry takeover (tests/drivers.rs,
drivers_keep_tls_sessions_through_a_takeover).

Connects with TLS required (libpq's environment: PGHOST, PGPORT, PGUSER,
PGPASSWORD, PGDATABASE; application_name ${DRIVER_APP_PREFIX}psycopg), sets
work_mem, prepares a statement (prepare=True: a named server-side
statement) and prints one JSON line of what the session is; then waits for
one line on stdin (the test sends it once the takeover is done), runs the
same queries again on the same connection plus one large result, prints a
second JSON line and exits 0. Any error ends it non-zero, with the
traceback on stderr.
"""

import json
import os
import sys

import psycopg

APP = os.environ["DRIVER_APP_PREFIX"] + "psycopg"
STMT = "select %s::int + 1 as hold_n, current_setting('work_mem') as hold_wm"


def tls_of(conn):
    """The TLS version and suite libpq negotiated, from PQsslAttribute of the
    libpq psycopg runs on (psycopg itself tells only whether TLS is in use);
    None when that libpq is not found."""
    if not conn.pgconn.ssl_in_use:
        return "not TLS"
    import ctypes
    import glob

    import psycopg_binary

    libs = glob.glob(os.path.join(os.path.dirname(psycopg_binary.__file__) + ".libs", "libpq*.so*"))
    if not libs:
        return None
    libpq = ctypes.CDLL(libs[0])
    libpq.PQsslAttribute.restype = ctypes.c_char_p
    libpq.PQsslAttribute.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ptr = ctypes.c_void_p(conn.pgconn.pgconn_ptr)
    parts = [libpq.PQsslAttribute(ptr, name) for name in (b"protocol", b"cipher")]
    return " ".join(p.decode() for p in parts if p) or None


def state(conn, round_):
    (n, wm) = conn.execute(STMT, [40 + round_], prepare=True).fetchone()
    (pid, start) = conn.execute(
        "select pid, backend_start::text from pg_stat_activity where pid = pg_backend_pid()"
    ).fetchone()
    (prepared,) = conn.execute(
        "select count(*) from pg_prepared_statements where strpos(statement, 'hold_' || 'n') > 0"
    ).fetchone()
    return {
        "driver": "psycopg",
        "pid": pid,
        "backend_start": start,
        "work_mem": conn.execute("show work_mem").fetchone()[0],
        "stmt": [n, wm],
        "server_prepared": prepared,
        "tls": tls_of(conn),
    }


def main():
    with psycopg.connect(
        application_name=APP, sslmode="require", connect_timeout=10, autocommit=True
    ) as conn:
        conn.execute("SET work_mem = '5MB'")
        first = state(conn, 1)
        print(json.dumps(first), flush=True)
        if not sys.stdin.readline():
            raise SystemExit("stdin closed before the go line")
        second = state(conn, 2)
        # The prepared statement once more, then a result of many records.
        second["stmt_again"] = list(conn.execute(STMT, [43], prepare=True).fetchone())
        (big,) = conn.execute("select repeat('x', 200000)").fetchone()
        second["big_len"] = len(big)
        second["big_all_x"] = big == "x" * len(big)
        print(json.dumps(second), flush=True)


if __name__ == "__main__":
    main()
