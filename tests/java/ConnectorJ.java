// A Connector/J workload for dbproxy's tests: every thread keeps user variables in its
// session and runs server-side prepared inserts and selects, transactions and a batch,
// checking every value it reads back. Prints "OK <rows>" or the first failure.
//
// java -cp <dir>:mariadb-java-client.jar ConnectorJ <port> <threads> <rounds>

import java.sql.*;
import java.util.concurrent.*;
import java.util.concurrent.atomic.*;

public class ConnectorJ {
    static String url(int port) {
        return "jdbc:mariadb://127.0.0.1:" + port + "/shop?user=app&password=app-secret"
            + "&useServerPrepStmts=true&connectTimeout=30000&socketTimeout=120000";
    }

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        int threads = Integer.parseInt(args[1]);
        int rounds = Integer.parseInt(args[2]);
        AtomicLong rows = new AtomicLong();
        AtomicReference<Throwable> failure = new AtomicReference<>();
        ExecutorService pool = Executors.newFixedThreadPool(threads);
        CountDownLatch ready = new CountDownLatch(threads);
        for (int t = 0; t < threads; t++) {
            final int me = t;
            pool.submit(() -> {
                try (Connection c = DriverManager.getConnection(url(port))) {
                    String name = "thread-é-" + me;
                    try (Statement st = c.createStatement()) {
                        st.execute("SET @me = " + me + ", @name = _utf8mb4'" + name + "'");
                    }
                    ready.countDown();
                    ready.await();
                    work(c, me, name, rounds, rows);
                } catch (Throwable e) {
                    failure.compareAndSet(null, new RuntimeException("thread " + me, e));
                    ready.countDown();
                }
                return null;
            });
        }
        pool.shutdown();
        pool.awaitTermination(10, TimeUnit.MINUTES);
        if (failure.get() != null) {
            failure.get().printStackTrace(System.out);
            System.out.println("FAILED");
            System.exit(1);
        }
        System.out.println("OK " + rows.get());
    }

    static void check(boolean ok, String what) {
        if (!ok) throw new IllegalStateException(what);
    }

    static void work(Connection c, int me, String name, int rounds, AtomicLong rows) throws SQLException {
        try (PreparedStatement ins = c.prepareStatement(
                 "INSERT INTO cj (thread, round, v, who) VALUES (?, ?, @me, @name)",
                 Statement.RETURN_GENERATED_KEYS);
             PreparedStatement sel = c.prepareStatement(
                 "SELECT v, who, @me, @name FROM cj WHERE id = ?");
             PreparedStatement upd = c.prepareStatement(
                 "UPDATE cj SET v = v + ? WHERE thread = ? AND round = ?");
             PreparedStatement batch = c.prepareStatement(
                 "INSERT INTO cjb (thread, round, k) VALUES (?, ?, ?)");
             PreparedStatement count = c.prepareStatement(
                 "SELECT COUNT(*), SUM(k) FROM cjb WHERE thread = ? AND round = ?")) {
            for (int r = 0; r < rounds; r++) {
                ins.setInt(1, me);
                ins.setInt(2, r);
                check(ins.executeUpdate() == 1, "insert count");
                long id;
                try (ResultSet k = ins.getGeneratedKeys()) {
                    check(k.next(), "generated key");
                    id = k.getLong(1);
                }
                try (Statement st = c.createStatement();
                     ResultSet lid = st.executeQuery("SELECT LAST_INSERT_ID()")) {
                    check(lid.next() && lid.getLong(1) == id,
                        "LAST_INSERT_ID() is this thread's id " + id);
                }
                sel.setLong(1, id);
                try (ResultSet rs = sel.executeQuery()) {
                    check(rs.next(), "row " + id);
                    check(rs.getInt(1) == me, "v = @me at insert time: " + rs.getInt(1));
                    check(name.equals(rs.getString(2)), "who: " + rs.getString(2));
                    check(rs.getInt(3) == me, "@me now: " + rs.getString(3));
                    check(name.equals(rs.getString(4)), "@name now: " + rs.getString(4));
                }
                // A transaction: update, read our own uncommitted change, commit.
                c.setAutoCommit(false);
                upd.setInt(1, 1000);
                upd.setInt(2, me);
                upd.setInt(3, r);
                check(upd.executeUpdate() == 1, "update count");
                sel.setLong(1, id);
                try (ResultSet rs = sel.executeQuery()) {
                    check(rs.next() && rs.getInt(1) == me + 1000, "own uncommitted update");
                }
                c.commit();
                c.setAutoCommit(true);
                // A batch of five.
                for (int k = 1; k <= 5; k++) {
                    batch.setInt(1, me);
                    batch.setInt(2, r);
                    batch.setInt(3, k);
                    batch.addBatch();
                }
                int[] done = batch.executeBatch();
                check(done.length == 5, "batch size");
                count.setInt(1, me);
                count.setInt(2, r);
                try (ResultSet rs = count.executeQuery()) {
                    check(rs.next() && rs.getInt(1) == 5 && rs.getInt(2) == 15, "batch rows");
                }
                rows.addAndGet(6);
            }
        }
    }
}
