// pgjdbc session held through a pgferry takeover (tests/drivers.rs,
// drivers_keep_tls_sessions_through_a_takeover).
//
// Connects with TLS required (sslmode=require: pgjdbc's LibPQFactory, which
// checks no certificate without sslmode=verify-*; PGHOST, PGPORT, PGUSER,
// PGPASSWORD, PGDATABASE from the environment; ApplicationName
// ${DRIVER_APP_PREFIX}pgjdbc), sets work_mem, uses a PreparedStatement with
// prepareThreshold=1 (a named server-side statement from its first use) and
// prints one JSON line of what the session is; then waits for one line on
// stdin (sent once the takeover is done), runs the same queries again on the
// same connection plus one large result, prints a second JSON line and
// exits 0. Any error ends it non-zero, with the stack trace on stderr.

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.sql.*;
import java.util.Properties;

public class Hold {
    static final String STMT = "select ?::int + 1 as hold_n, current_setting('work_mem') as hold_wm";

    static String q(String s) {
        if (s == null) return "null";
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }

    /** The TLS version and suite of the connection's socket, read through
     * pgjdbc's internals (null when they are not where expected). */
    static String tls(Connection c) {
        try {
            Object executor = ((org.postgresql.core.BaseConnection) c).getQueryExecutor();
            java.lang.reflect.Field f =
                org.postgresql.core.QueryExecutorBase.class.getDeclaredField("pgStream");
            f.setAccessible(true);
            java.net.Socket s = ((org.postgresql.core.PGStream) f.get(executor)).getSocket();
            if (!(s instanceof javax.net.ssl.SSLSocket)) return "not TLS";
            javax.net.ssl.SSLSession session = ((javax.net.ssl.SSLSocket) s).getSession();
            return session.getProtocol() + " " + session.getCipherSuite();
        } catch (Exception e) {
            return null;
        }
    }

    static String stmt(PreparedStatement ps, int v) throws SQLException {
        ps.setInt(1, v);
        try (ResultSet rs = ps.executeQuery()) {
            rs.next();
            return "[" + rs.getInt(1) + "," + q(rs.getString(2)) + "]";
        }
    }

    static String one(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
            rs.next();
            return rs.getString(1);
        }
    }

    static String state(Connection c, PreparedStatement ps, int round) throws SQLException {
        String stmt = stmt(ps, 40 + round);
        String pid, start;
        try (Statement s = c.createStatement();
             ResultSet rs = s.executeQuery(
                 "select pid, backend_start::text from pg_stat_activity where pid = pg_backend_pid()")) {
            rs.next();
            pid = Integer.toString(rs.getInt(1));
            start = rs.getString(2);
        }
        String prepared = one(c,
            "select count(*) from pg_prepared_statements where strpos(statement, 'hold_' || 'n') > 0");
        return "\"driver\":\"pgjdbc\",\"pid\":" + pid + ",\"backend_start\":" + q(start)
            + ",\"work_mem\":" + q(one(c, "show work_mem")) + ",\"stmt\":" + stmt
            + ",\"server_prepared\":" + prepared + ",\"tls\":" + q(tls(c));
    }

    public static void main(String[] args) throws Exception {
        Properties p = new Properties();
        p.setProperty("user", System.getenv("PGUSER"));
        p.setProperty("password", System.getenv("PGPASSWORD"));
        p.setProperty("ApplicationName", System.getenv("DRIVER_APP_PREFIX") + "pgjdbc");
        p.setProperty("connectTimeout", "10");
        p.setProperty("sslmode", "require");
        p.setProperty("prepareThreshold", "1");
        String url = "jdbc:postgresql://" + System.getenv("PGHOST") + ":" + System.getenv("PGPORT")
            + "/" + System.getenv("PGDATABASE") + "?assumeMinServerVersion=9.0";
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        try (Connection c = DriverManager.getConnection(url, p);
             PreparedStatement ps = c.prepareStatement(STMT)) {
            try (Statement s = c.createStatement()) {
                s.execute("SET work_mem = '5MB'");
            }
            System.out.println("{" + state(c, ps, 1) + "}");
            System.out.flush();
            if (in.readLine() == null) throw new IllegalStateException("stdin closed before the go line");
            String second = state(c, ps, 2);
            String again = stmt(ps, 43);
            String big = one(c, "select repeat('x', 200000)");
            boolean allX = big.chars().allMatch(ch -> ch == 'x');
            System.out.println("{" + second + ",\"stmt_again\":" + again + ",\"big_len\":" + big.length()
                + ",\"big_all_x\":" + allX + "}");
            System.out.flush();
        }
    }
}
