// pgjdbc through dbproxy: server-side prepared statements from the first execution
// (prepareThreshold=1), transactions, batches and an error mid-session, 8 threads at once.
// usage: java PgJdbc PORT PASSWORD
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class PgJdbc {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/shop?prepareThreshold=1&sslmode=disable";
        Properties p = new Properties();
        p.setProperty("user", "app");
        p.setProperty("password", args[1]);
        int threads = 8, rounds = 100;
        ExecutorService pool = Executors.newFixedThreadPool(threads);
        List<Future<String>> done = new ArrayList<>();
        for (int t = 0; t < threads; t++) {
            final int id = t;
            done.add(pool.submit(() -> {
                try (Connection c = DriverManager.getConnection(url, p)) {
                    try (Statement s = c.createStatement()) {
                        s.execute("SET application_name = 'jdbc" + id + "'");
                    }
                    PreparedStatement add = c.prepareStatement("SELECT ?::int + 1, current_setting('application_name')");
                    PreparedStatement ins = c.prepareStatement("INSERT INTO clients_log (client, round) VALUES (?, ?)");
                    PreparedStatement count = c.prepareStatement("SELECT count(*) FROM clients_log WHERE client = ?");
                    for (int r = 0; r < rounds; r++) {
                        add.setInt(1, r);
                        try (ResultSet rs = add.executeQuery()) {
                            rs.next();
                            if (rs.getInt(1) != r + 1 || !rs.getString(2).equals("jdbc" + id))
                                throw new AssertionError("thread " + id + " round " + r + ": " + rs.getInt(1) + " " + rs.getString(2));
                        }
                        c.setAutoCommit(false);
                        ins.setString(1, "jdbc" + id);
                        ins.setInt(2, r);
                        ins.addBatch();
                        ins.setString(1, "jdbc" + id);
                        ins.setInt(2, -r);
                        ins.addBatch();
                        ins.executeBatch();
                        count.setString(1, "jdbc" + id);
                        try (ResultSet rs = count.executeQuery()) {
                            rs.next();
                            if (rs.getLong(1) != 2L * (r + 1))
                                throw new AssertionError("thread " + id + " round " + r + ": count " + rs.getLong(1));
                        }
                        c.commit();
                        c.setAutoCommit(true);
                        if (r % 25 == 0) {
                            try (PreparedStatement bad = c.prepareStatement("SELECT 1 / ?::int")) {
                                bad.setInt(1, 0);
                                bad.executeQuery();
                                throw new AssertionError("division by zero passed");
                            } catch (SQLException e) {
                                if (!"22012".equals(e.getSQLState())) throw e;
                            }
                        }
                    }
                }
                return "ok";
            }));
        }
        for (Future<String> f : done) f.get();
        pool.shutdown();
        System.out.println("pgjdbc: " + threads + " threads x " + rounds + " rounds ok");
    }
}
