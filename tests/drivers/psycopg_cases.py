"""psycopg 3 cases of the driver matrix (tests/drivers.rs).

Connection parameters come from libpq's environment variables (PGHOST,
PGPORT, PGUSER, PGPASSWORD, PGDATABASE). Every session of case NAME uses
application_name ${DRIVER_APP_PREFIX}NAME, so the harness can move the
sessions of one case and count their moves. CHECK_PORTS lists the ports of
the PostgreSQL clusters behind pgferry: data written through pgferry lands
on whichever backend the session was on at the time, so checks of written
data read all of them directly.

Runs the cases named as arguments (all without; `--list` lists them) and
prints one JSON object per case: {"case": NAME, "result": ...}. A result
holds only what must be the same whichever way the driver is connected;
values that differ per run (pids) are reduced to properties.
"""

import asyncio
import json
import os
import sys
import time
import traceback
import urllib.request

import psycopg
from psycopg import sql

PREFIX = os.environ["DRIVER_APP_PREFIX"]
CHECK_PORTS = [int(p) for p in os.environ["CHECK_PORTS"].split(",")]
ADMIN = os.environ["PGFERRY_ADMIN_URL"]
GAP = 0.03


def pace():
    """Pacing, not synchronization: an idle gap that gives the mover (a
    transfer request every 100 ms) a chance to move the session."""
    time.sleep(GAP)


def moves_of(app):
    """Moves of the live sessions of `app` so far, per pgferry's admin API
    (0 when the session is not pgferry's, as in the direct mode)."""
    with urllib.request.urlopen(ADMIN + "/v1/connections", timeout=10) as r:
        sessions = json.load(r)
    return sum(s["migrations"] for s in sessions if s["application_name"] == app)


def await_a_move(app, before, limit):
    """Waits until a session of `app` has moved since `before`, or `limit`
    seconds (modes without a mover). Polls: the move happens in another
    process and there is nothing to await."""
    deadline = time.monotonic() + limit
    while moves_of(app) == before and time.monotonic() < deadline:
        time.sleep(0.01)


def connect(app, **kw):
    kw.setdefault("autocommit", True)
    return psycopg.connect(application_name=app, connect_timeout=10, **kw)


def everywhere(query, params=()):
    """Runs a read-only query on every cluster directly; returns the rows of
    all of them."""
    rows = []
    for port in CHECK_PORTS:
        with psycopg.connect(port=port, application_name="matrix-check", autocommit=True) as c:
            rows.extend(c.execute(query, params).fetchall())
    return rows


def sqlstate_of(e):
    return getattr(e, "sqlstate", None) or getattr(getattr(e, "diag", None), "sqlstate", None)


def case_backend_pid(app):
    same = []
    with connect(app) as conn:
        for _ in range(6):
            (pid,) = conn.execute("select pg_backend_pid()").fetchone()
            same.append(pid == conn.info.backend_pid)
            pace()
    return {"pid_matches_pg_backend_pid": same}


def case_sync_types(app):
    rounds = []
    with connect(app) as conn:
        conn.execute("set timezone to 'Asia/Tokyo'")
        conn.execute("set search_path to shop, public")
        for i in range(6):
            row = conn.execute(
                "select %s::int + 1, %s::text, 1.25::numeric, '2020-01-02'::date, "
                "array[1, 2, %s], '{\"a\": [1, null]}'::jsonb, null::text, "
                "'2020-01-01 00:00:00+00'::timestamptz::text, current_setting('search_path')",
                (i, "héllo ✓", i),
            ).fetchone()
            rounds.append([str(v) if v is not None else None for v in row])
            pace()
    return rounds


def case_async(app):
    async def one(k):
        out = []
        conn = await psycopg.AsyncConnection.connect(
            application_name=app, autocommit=True, connect_timeout=10
        )
        async with conn:
            for i in range(6):
                cur = await conn.execute("select %s::int * %s::int, repeat('x', %s)", (k, i, i))
                out.append(list(await cur.fetchone()))
                # Pacing, not synchronization (see pace()).
                await asyncio.sleep(GAP)
        return out

    async def main():
        return await asyncio.gather(one(2), one(3), one(5))

    return asyncio.run(main())


def case_pipeline(app):
    res = {}
    with connect(app) as conn:
        for r in range(3):
            with conn.pipeline():
                c1 = conn.execute("select %s::int", (r,))
                c2 = conn.execute(
                    "insert into drv_items(run, k, v) values (%s, %s, 'ok') returning k",
                    (app, r),
                )
                # Same implicit transaction, so the same backend: sees the row.
                c3 = conn.execute(
                    "select count(*) from drv_items where run = %s and k = %s", (app, r)
                )
                got = [c1.fetchone()[0], c2.fetchone()[0], c3.fetchone()[0]]
            res.setdefault("rounds", []).append(got)
            pace()
        # Each pipeline's Sync committed its INSERT, wherever it ran.
        res["committed_rows_anywhere"] = sum(
            r[0] for r in everywhere("select count(*) from drv_items where run = %s and k < 100", (app,))
        )
        # One batch, one Sync: one implicit transaction. The second INSERT
        # violates the primary key, so the first must be rolled back too.
        try:
            with conn.pipeline():
                conn.execute("insert into drv_items(run, k, v) values (%s, 100, 'first')", (app,))
                conn.execute("insert into drv_items(run, k, v) values (%s, 100, 'dup')", (app,))
            res["batch_error"] = None
        except psycopg.Error as e:
            res["batch_error"] = sqlstate_of(e)
        pace()
        res["after_error"] = conn.execute("select 'still usable'").fetchone()[0]
        pace()
    res["rolled_back_rows_anywhere"] = sum(
        r[0] for r in everywhere("select count(*) from drv_items where run = %s and k = 100", (app,))
    )
    return res


def case_server_cursor(app):
    totals = []
    with connect(app, autocommit=False) as conn:
        for r in range(3):
            with conn.transaction():
                with conn.cursor(name=f"cur{r}") as cur:
                    cur.execute("select g, g * g from generate_series(1, 500) g")
                    seen = 0
                    s = 0
                    while True:
                        rows = cur.fetchmany(100)
                        if not rows:
                            break
                        seen += len(rows)
                        s += sum(b for _, b in rows)
                        pace()
                    totals.append([seen, s])
            pace()
    return totals


def case_copy(app):
    out = []
    with connect(app) as conn:
        for r in range(3):
            with conn.transaction():
                with conn.cursor().copy("copy drv_items(run, k, v) from stdin") as cp:
                    for k in range(50):
                        cp.write_row((app, r * 1000 + k, f"zeile {k} – ü"))
                n = conn.execute(
                    "select count(*), min(v) from drv_items where run = %s and k >= %s and k < %s",
                    (app, r * 1000, r * 1000 + 1000),
                ).fetchone()
            pace()
            text = []
            with conn.cursor().copy(
                "copy (select g, 'é' || g from generate_series(1, 20) g) to stdout"
            ) as cp:
                for row in cp.rows():
                    text.append(list(row))
            out.append({"copied_in": list(n), "copied_out": text[:3] + [len(text)]})
            pace()
    return out


def case_listen_notify(app):
    got = []
    with connect(app) as conn:
        conn.execute("listen drv_channel")
        for i in range(3):
            conn.execute("select pg_notify('drv_channel', %s)", (f"msg {i}",))
            for n in conn.notifies(timeout=5, stop_after=1):
                got.append(
                    {"payload": n.payload, "notify_pid_is_own_backend_pid": n.pid == conn.info.backend_pid}
                )
            pace()
        conn.execute("unlisten *")
        pace()
        # Free to move again: a few more round trips.
        for _ in range(4):
            conn.execute("select 1")
            pace()
    return got


def case_terminate(app):
    # A pool's broken-connection check: the session terminates the backend
    # its driver says it has (conn.info.backend_pid). Signalling *another*
    # session only works when both sit on the same backend, which through a
    # proxy of several backends they need not (docs/migration.md).
    res = {}
    victim = connect(app)
    for _ in range(4):
        victim.execute("select 1")
        pace()
    try:
        rows = victim.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity "
            "where pid = %s and application_name = %s",
            (victim.info.backend_pid, app),
        ).fetchall()
        res["outcome"] = {"returned": [r[0] for r in rows]}
    except psycopg.Error as e:
        res["outcome"] = {
            "sqlstate": sqlstate_of(e),
            "admin_shutdown": "terminating connection due to administrator command" in str(e),
        }
    res["closed"] = victim.closed
    victim.close()
    return res


def case_auto_prepare(app):
    vals = []
    with connect(app) as conn:
        conn.prepare_threshold = 2
        for i in range(10):
            vals.append(conn.execute("select %s::int * 7, 'p'", (i,)).fetchone()[0])
            pace()
        (n,) = conn.execute(
            "select count(*) from pg_prepared_statements where statement like 'select $1::int * 7%%'"
        ).fetchone()
    return {"values": vals, "server_prepared": n}


def case_client_encoding(app):
    out = []
    with connect(app) as conn:
        conn.execute("set client_encoding to 'LATIN1'")
        for s in ["héllo", "Größe", "ñandú ça"]:
            row = conn.execute(
                "select %s::text, length(%s::text), 'é' || %s::text, current_setting('client_encoding')",
                (s, s, s),
            ).fetchone()
            out.append(list(row) + [conn.info.encoding])
            pace()
        try:
            conn.execute("select %s::text", ("✓ not latin1",))
            out.append("no error")
        except (psycopg.Error, UnicodeError) as e:
            out.append(type(e).__name__)
        pace()
        out.append(conn.execute("select 'fin ü'").fetchone()[0])
    return out


def case_tpc(app):
    res = []
    for r in range(3):
        # A connection per round: one whose two-phase commit failed is
        # stuck in it as far as psycopg is concerned.
        conn = connect(app, autocommit=False)
        step = "begin"
        try:
            conn.tpc_begin(f"{app}-{r}")
            conn.execute("insert into drv_items(run, k, v) values (%s, %s, 'tpc')", (app, r))
            step = "prepare"
            before = moves_of(app)
            conn.tpc_prepare()
            # Idle between PREPARE TRANSACTION and COMMIT PREPARED until the
            # session has moved once (mode 3), or 0.3 s (the other modes): a
            # fixed gap would see 1 or 2 moves, and after 2 the session is
            # back where it prepared.
            await_a_move(app, before, 0.3)
            step = "commit"
            conn.tpc_commit()
            res.append("committed")
        except psycopg.Error as e:
            res.append(f"{step} failed: {sqlstate_of(e)}")
        finally:
            conn.close()
        pace()
    res.append(
        {
            "rows_anywhere": sum(
                r[0] for r in everywhere("select count(*) from drv_items where run = %s", (app,))
            ),
            "prepared_left_anywhere": sum(
                r[0]
                for r in everywhere(
                    "select count(*) from pg_prepared_xacts where gid like %s", (f"{app}-%",)
                )
            ),
        }
    )
    return res


CASES = [
    ("backend_pid", case_backend_pid),
    ("sync_types", case_sync_types),
    ("async", case_async),
    ("pipeline", case_pipeline),
    ("server_cursor", case_server_cursor),
    ("copy", case_copy),
    ("listen_notify", case_listen_notify),
    ("terminate", case_terminate),
    ("auto_prepare", case_auto_prepare),
    ("client_encoding", case_client_encoding),
    ("tpc", case_tpc),
]


def main():
    if sys.argv[1:] == ["--list"]:
        print("\n".join(name for name, _ in CASES))
        return
    only = set(sys.argv[1:])
    for name, fn in CASES:
        if only and name not in only:
            continue
        try:
            out = {"case": name, "result": fn(PREFIX + name)}
        except Exception as e:  # reported as the case's result
            out = {"case": name, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        print(json.dumps(out, ensure_ascii=False, default=str), flush=True)


if __name__ == "__main__":
    main()
