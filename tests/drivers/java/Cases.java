// pgjdbc cases of the driver matrix (tests/drivers.rs).
//
// Connection parameters: PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE.
// Every session of case NAME uses ApplicationName ${DRIVER_APP_PREFIX}NAME.
// CHECK_PORTS: the ports of the clusters behind pgferry, read directly to
// observe server state. Runs the cases named as arguments (all without;
// `--list` lists them) and prints one JSON object per case:
// {"case": NAME, "result": ...} (results are built as JSON text here to
// need nothing but the JDK and the driver).

import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class Cases {
    static final String PREFIX = System.getenv("DRIVER_APP_PREFIX");
    static final String HOST = System.getenv("PGHOST");
    static final String PORT = System.getenv("PGPORT");
    static final String DB = System.getenv("PGDATABASE");
    static final String[] CHECK_PORTS = System.getenv("CHECK_PORTS").split(",");

    /** Pacing, not synchronization: an idle gap that gives the mover (a
     * transfer request every 100 ms) a chance to move the session. */
    static void pace() throws InterruptedException {
        Thread.sleep(30);
    }

    static Connection connect(String port, String app, String extra) throws SQLException {
        Properties p = new Properties();
        p.setProperty("user", System.getenv("PGUSER"));
        p.setProperty("password", System.getenv("PGPASSWORD"));
        p.setProperty("ApplicationName", app);
        p.setProperty("connectTimeout", "10");
        // assumeMinServerVersion: without it pgjdbc sends ApplicationName
        // with a SET after the startup, and pgferry's admin API (so the
        // mover) only knows the startup packet's application_name.
        String url = "jdbc:postgresql://" + HOST + ":" + port + "/" + DB
            + "?assumeMinServerVersion=9.0" + extra;
        return DriverManager.getConnection(url, p);
    }

    static Connection connect(String app, String extra) throws SQLException {
        return connect(PORT, app, extra);
    }

    static String q(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }

    static long serverStatements(Connection c) throws SQLException {
        try (Statement s = c.createStatement();
             ResultSet rs = s.executeQuery("select count(*) from pg_prepared_statements where statement like 'select $1::int * 11%'")) {
            rs.next();
            return rs.getLong(1);
        }
    }

    /** prepareThreshold (default 5, and 1) reached, then more executions. */
    static String prepareThreshold(String app) throws Exception {
        StringBuilder out = new StringBuilder("{");
        for (String extra : new String[] {"", "&prepareThreshold=1"}) {
            try (Connection c = connect(app, extra);
                 PreparedStatement ps = c.prepareStatement("select ?::int * 11, ?::text")) {
                List<String> vals = new ArrayList<>();
                for (int i = 0; i < 12; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "ü" + i);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        vals.add(rs.getInt(1) + ":" + rs.getString(2));
                    }
                    pace();
                }
                if (out.length() > 1) out.append(',');
                out.append(q(extra.isEmpty() ? "default" : "threshold1")).append(":{\"values\":")
                   .append(q(String.join(",", vals)))
                   .append(",\"server_statements\":").append(serverStatements(c)).append('}');
            }
        }
        return out.append('}').toString();
    }

    static String batch(String app) throws Exception {
        List<String> out = new ArrayList<>();
        try (Connection c = connect(app, "")) {
            for (int r = 0; r < 3; r++) {
                c.setAutoCommit(false);
                try (PreparedStatement ps = c.prepareStatement("insert into drv_items(run, k, v) values (?, ?, ?)")) {
                    for (int k = 0; k < 40; k++) {
                        ps.setString(1, app);
                        ps.setInt(2, r * 1000 + k);
                        ps.setString(3, "b" + k);
                        ps.addBatch();
                    }
                    int[] counts = ps.executeBatch();
                    int sum = 0;
                    for (int n : counts) sum += (n == Statement.SUCCESS_NO_INFO ? 1 : n);
                    long seen;
                    try (PreparedStatement cnt = c.prepareStatement("select count(*) from drv_items where run = ? and k >= ? and k < ?")) {
                        cnt.setString(1, app);
                        cnt.setInt(2, r * 1000);
                        cnt.setInt(3, r * 1000 + 1000);
                        try (ResultSet rs = cnt.executeQuery()) { rs.next(); seen = rs.getLong(1); }
                    }
                    c.commit();
                    out.add("{\"batch\":" + counts.length + ",\"updated\":" + sum + ",\"seen\":" + seen + "}");
                }
                c.setAutoCommit(true);
                pace();
                try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("select 'between'")) {
                    rs.next();
                    out.add(q(rs.getString(1)));
                }
                pace();
            }
        }
        return "[" + String.join(",", out) + "]";
    }

    static String fetchSize(String app) throws Exception {
        List<String> out = new ArrayList<>();
        try (Connection c = connect(app, "")) {
            for (int r = 0; r < 3; r++) {
                c.setAutoCommit(false);
                try (Statement s = c.createStatement()) {
                    s.setFetchSize(50);
                    try (ResultSet rs = s.executeQuery("select g, md5(g::text) from generate_series(1, 400) g")) {
                        long n = 0, sum = 0;
                        String last = null;
                        while (rs.next()) {
                            n++;
                            sum += rs.getLong(1);
                            last = rs.getString(2);
                            if (n % 100 == 0) pace();
                        }
                        out.add("[" + n + "," + sum + "," + q(last) + "]");
                    }
                }
                c.commit();
                c.setAutoCommit(true);
                pace();
            }
        }
        return "[" + String.join(",", out) + "]";
    }

    /** Waits until a cluster reports a session of `app` running `like`. */
    static void awaitActive(String app, String like) throws Exception {
        long deadline = System.currentTimeMillis() + 10000;
        for (;;) {
            for (String port : CHECK_PORTS) {
                try (Connection c = connect(port, "matrix-check", "");
                     PreparedStatement ps = c.prepareStatement(
                         "select count(*) from pg_stat_activity where application_name = ? and state = 'active' and query like ?")) {
                    ps.setString(1, app);
                    ps.setString(2, like);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        if (rs.getLong(1) > 0) return;
                    }
                }
            }
            if (System.currentTimeMillis() > deadline) throw new Exception("no active " + like);
            // Polling another process's state: no event to await.
            Thread.sleep(20);
        }
    }

    static String cancel(String app) throws Exception {
        List<String> out = new ArrayList<>();
        ExecutorService ex = Executors.newSingleThreadExecutor();
        try (Connection c = connect(app, "")) {
            for (int r = 0; r < 2; r++) {
                try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("select 1")) { rs.next(); }
                pace();
                Statement s = c.createStatement();
                long started = System.currentTimeMillis();
                Future<String> f = ex.submit(() -> {
                    try {
                        s.execute("select pg_sleep(10)");
                        return "\"not cancelled\"";
                    } catch (SQLException e) {
                        return "{\"sqlstate\":" + q(String.valueOf(e.getSQLState())) + "}";
                    }
                });
                awaitActive(app, "select pg_sleep(10)%");
                s.cancel();
                String res = f.get(8, TimeUnit.SECONDS);
                out.add(res);
                out.add("{\"under_5s\":" + (System.currentTimeMillis() - started < 5000) + "}");
                s.close();
                pace();
                try (Statement s2 = c.createStatement(); ResultSet rs = s2.executeQuery("select 'usable'")) {
                    rs.next();
                    out.add(q(rs.getString(1)));
                }
                pace();
            }
        } finally {
            ex.shutdownNow();
        }
        return "[" + String.join(",", out) + "]";
    }

    interface Case { String run(String app) throws Exception; }

    public static void main(String[] args) throws Exception {
        LinkedHashMap<String, Case> cases = new LinkedHashMap<>();
        cases.put("prepare_threshold", Cases::prepareThreshold);
        cases.put("batch", Cases::batch);
        cases.put("fetch_size", Cases::fetchSize);
        cases.put("cancel", Cases::cancel);
        if (args.length == 1 && args[0].equals("--list")) {
            cases.keySet().forEach(System.out::println);
            return;
        }
        Set<String> only = new HashSet<>(Arrays.asList(args));
        for (Map.Entry<String, Case> e : cases.entrySet()) {
            if (!only.isEmpty() && !only.contains(e.getKey())) continue;
            String line;
            try {
                line = "{\"case\":" + q(e.getKey()) + ",\"result\":" + e.getValue().run(PREFIX + e.getKey()) + "}";
            } catch (Exception err) {
                line = "{\"case\":" + q(e.getKey()) + ",\"error\":" + q(err.toString()) + "}";
            }
            System.out.println(line);
            System.out.flush();
        }
    }
}
