// node-postgres session held through a pgferry takeover (tests/drivers.rs,
// drivers_keep_tls_sessions_through_a_takeover).
//
// Connects with TLS required (ssl without certificate checks; PGHOST,
// PGPORT, PGUSER, PGPASSWORD, PGDATABASE from the environment;
// application_name ${DRIVER_APP_PREFIX}node-pg), sets work_mem, runs a
// named query (a server-side prepared statement node-postgres reuses by
// name) and prints one JSON line of what the session is; then waits for one
// line on stdin (sent once the takeover is done), runs the same queries
// again on the same connection plus one large result, prints a second JSON
// line and exits 0. Any error ends it non-zero, with the error on stderr.
'use strict'

const pg = require('pg')
const readline = require('readline')

const APP = process.env.DRIVER_APP_PREFIX + 'node-pg'
const STMT = "select $1::int + 1 as hold_n, current_setting('work_mem') as hold_wm"

async function state(c, round) {
  const s = await c.query({ name: 'hold', text: STMT, values: [40 + round] })
  const b = await c.query(
    'select pid, backend_start::text as start from pg_stat_activity where pid = pg_backend_pid()'
  )
  const p = await c.query(
    "select count(*)::int as n from pg_prepared_statements where strpos(statement, 'hold_' || 'n') > 0"
  )
  const wm = await c.query('show work_mem')
  const sock = c.connection.stream
  return {
    driver: 'node-pg',
    pid: b.rows[0].pid,
    backend_start: b.rows[0].start,
    work_mem: wm.rows[0].work_mem,
    stmt: [s.rows[0].hold_n, s.rows[0].hold_wm],
    server_prepared: p.rows[0].n,
    tls: sock.getProtocol ? `${sock.getProtocol()} ${sock.getCipher().standardName}` : null,
  }
}

// The next line on stdin.
function nextLine() {
  return new Promise((resolve, reject) => {
    const rl = readline.createInterface({ input: process.stdin })
    rl.once('line', (line) => {
      // Resolved first: close() emits 'close' at once.
      resolve(line)
      rl.close()
    })
    rl.once('close', () => reject(new Error('stdin closed before the go line')))
  })
}

async function main() {
  const c = new pg.Client({
    application_name: APP,
    connectionTimeoutMillis: 10000,
    ssl: { rejectUnauthorized: false },
  })
  // An error on the idle connection (while the takeover happens) is
  // reported; the queries after it fail on their own.
  c.on('error', (e) => console.error(`connection error while idle: ${e.code || ''} ${e.stack}`))
  await c.connect()
  await c.query("SET work_mem = '5MB'")
  process.stdout.write(JSON.stringify(await state(c, 1)) + '\n')
  await nextLine()
  const second = await state(c, 2)
  const again = await c.query({ name: 'hold', text: STMT, values: [43] })
  second.stmt_again = [again.rows[0].hold_n, again.rows[0].hold_wm]
  const big = (await c.query("select repeat('x', 200000) as big")).rows[0].big
  second.big_len = big.length
  second.big_all_x = big === 'x'.repeat(big.length)
  process.stdout.write(JSON.stringify(second) + '\n')
  await c.end()
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(e)
    process.exit(1)
  }
)
