// node-postgres cases of the driver matrix (tests/drivers.rs).
//
// Connection parameters: PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE
// (node-postgres reads them itself). Every session of case NAME uses
// application_name ${DRIVER_APP_PREFIX}NAME. CHECK_PORTS: the ports of the
// clusters behind pgferry, read directly to observe server state.
// Runs the cases named as arguments (all without; `--list` lists them) and
// prints one JSON object per case: {"case": NAME, "result": ...}.
'use strict'

const pg = require('pg')
const Cursor = require('pg-cursor')

const PREFIX = process.env.DRIVER_APP_PREFIX
const CHECK_PORTS = process.env.CHECK_PORTS.split(',').map(Number)
const GAP_MS = 30

// Pacing, not synchronization: an idle gap that gives the mover (a transfer
// request every 100 ms) a chance to move the session.
const pace = () => new Promise((resolve) => setTimeout(resolve, GAP_MS))

const client = (app) => new pg.Client({ application_name: app, connectionTimeoutMillis: 10000 })

// Rejects if `p` has not settled after `ms`: a hang is a result too.
function within(ms, p, what) {
  let timer
  const t = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer after ${ms} ms`)), ms)
  })
  return Promise.race([p, t]).finally(() => clearTimeout(timer))
}

// Waits until a cluster reports a session of `app` running `like`; the
// query runs somewhere behind pgferry, so every cluster is asked directly.
async function awaitActive(app, like) {
  const deadline = Date.now() + 10000
  for (;;) {
    for (const port of CHECK_PORTS) {
      const c = new pg.Client({ port, application_name: 'matrix-check' })
      await c.connect()
      try {
        const r = await c.query(
          "select count(*)::int as n from pg_stat_activity where application_name = $1 and state = 'active' and query like $2",
          [app, like]
        )
        if (r.rows[0].n > 0) return
      } finally {
        await c.end()
      }
    }
    if (Date.now() > deadline) throw new Error(`no active ${like} of ${app}`)
    // Polling another process's state: no event to await.
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

const cases = {
  async process_id(app) {
    const c = client(app)
    await c.connect()
    const same = []
    for (let i = 0; i < 6; i++) {
      const r = await c.query('select pg_backend_pid() as pid')
      same.push(r.rows[0].pid === c.processID)
      await pace()
    }
    await c.end()
    return { processID_matches_pg_backend_pid: same }
  },

  async pool(app) {
    const pool = new pg.Pool({ application_name: app, max: 4, connectionTimeoutMillis: 10000 })
    const rounds = []
    for (let r = 0; r < 4; r++) {
      const rs = await Promise.all(
        Array.from({ length: 12 }, (_, i) =>
          pool.query('select $1::int * $2::int as v, $3::text as t', [i, r, `r${r}-é`])
        )
      )
      rounds.push(rs.map((x) => [x.rows[0].v, x.rows[0].t]))
      await pace()
    }
    // Every client of the pool once more, held at the same time.
    const held = await Promise.all(Array.from({ length: 4 }, () => pool.connect()))
    const each = []
    for (const c of held) {
      each.push((await c.query("select 'held' as h")).rows[0].h)
      await pace()
    }
    held.forEach((c) => c.release())
    await pool.end()
    return { rounds, held: each }
  },

  async params(app) {
    const c = client(app)
    await c.connect()
    const out = []
    for (let i = 0; i < 6; i++) {
      // Unnamed statement: Parse/Bind/Execute/Sync every time.
      const a = await c.query('select $1::int + 1 as n, $2::text as s, $3::jsonb as j, $4::bool as b', [
        i,
        'ünï',
        JSON.stringify({ k: i }),
        i % 2 === 0,
      ])
      await pace()
      // Named statement: parsed once per connection, then only bound.
      const b = await c.query({ name: 'drv_named', text: 'select $1::int * 3 as m, now() is not null as t', values: [i] })
      out.push([a.rows[0], b.rows[0]])
      await pace()
    }
    await c.end()
    return out
  },

  async cursor(app) {
    const c = client(app)
    await c.connect()
    const totals = []
    for (let r = 0; r < 3; r++) {
      const cur = c.query(new Cursor('select g, g * $1::int as x from generate_series(1, 400) g', [r + 1]))
      let n = 0
      let sum = 0
      for (;;) {
        const rows = await cur.read(100)
        if (rows.length === 0) break
        n += rows.length
        sum += rows.reduce((s, row) => s + row.x, 0)
        await pace()
      }
      await cur.close()
      totals.push([n, sum])
      await pace()
      totals.push((await c.query('select 1 as after_cursor')).rows[0])
      await pace()
    }
    await c.end()
    return totals
  },

  async cancel(app) {
    const c = client(app)
    await c.connect()
    const out = []
    for (let r = 0; r < 2; r++) {
      await c.query('select 1')
      await pace()
      const started = Date.now()
      const q = new pg.Query('select pg_sleep(10)')
      const done = new Promise((resolve) => {
        q.on('error', (e) => resolve({ code: e.code, message: e.message }))
        q.on('end', () => resolve('not cancelled'))
      })
      c.query(q)
      await awaitActive(app, 'select pg_sleep(10)%')
      // node-postgres's cancel: a second Client sends a CancelRequest with
      // c's processID and secretKey.
      new pg.Client({ application_name: app }).cancel(c, q)
      const res = await within(8000, done, 'cancelled query')
      out.push({ ...res, under_5s: Date.now() - started < 5000 })
      await pace()
      out.push((await c.query("select 'usable' as after")).rows[0])
      await pace()
    }
    await c.end()
    return out
  },

  async after_end(app) {
    const c = client(app)
    await c.connect()
    const out = []
    for (let i = 0; i < 4; i++) {
      out.push((await c.query('select $1::int as i', [i])).rows[0].i)
      await pace()
    }
    await c.end()
    try {
      await within(5000, c.query('select 1'), 'query after end')
      out.push('query after end succeeded')
    } catch (e) {
      out.push({ rejected: true, message: e.message })
    }
    return out
  },
}

async function main() {
  const only = process.argv.slice(2)
  if (only.length === 1 && only[0] === '--list') {
    process.stdout.write(Object.keys(cases).join('\n') + '\n')
    return
  }
  for (const [name, fn] of Object.entries(cases)) {
    if (only.length && !only.includes(name)) continue
    let out
    try {
      out = { case: name, result: await fn(PREFIX + name) }
    } catch (e) {
      out = { case: name, error: `${e.code || ''} ${e.message}`, trace: e.stack }
    }
    process.stdout.write(JSON.stringify(out) + '\n')
  }
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(e)
    process.exit(1)
  }
)
