// Connector/J through a failover: an autocommit writer (server-side prepared statement) and a
// client in transactions, on one connection each, for <seconds> while the test kills the
// primary and promotes the replica. Prints "OK <writer errors> <transaction errors>
// <server id> <valid>" at the end: the same two Connection objects, never reopened.
//
// java -cp <dir>:mariadb-java-client.jar FailoverClient <port> <password> <seconds>

import java.sql.*;

public class FailoverClient {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:mariadb://127.0.0.1:" + args[0] + "/shop?user=app&password=" + args[1]
            + "&useServerPrepStmts=true&connectTimeout=30000&socketTimeout=120000";
        long end = System.currentTimeMillis() + Long.parseLong(args[2]) * 1000;
        try (Connection c = DriverManager.getConnection(url);
             Connection t = DriverManager.getConnection(url);
             PreparedStatement ins = c.prepareStatement("INSERT INTO jdrill VALUES (?, ?)")) {
            t.setAutoCommit(false);
            int seq = 0, writerErrors = 0, txErrors = 0;
            while (System.currentTimeMillis() < end) {
                seq++;
                try {
                    ins.setInt(1, 1);
                    ins.setInt(2, seq);
                    ins.executeUpdate();
                } catch (SQLException e) {
                    writerErrors++;
                    System.err.println("writer: " + e.getSQLState() + " " + e.getMessage());
                }
                try (Statement s = t.createStatement()) {
                    s.executeUpdate("INSERT INTO jdrill VALUES (2, " + seq + ")");
                    t.commit();
                } catch (SQLException e) {
                    txErrors++;
                    System.err.println("transaction: " + e.getSQLState() + " " + e.getMessage());
                    try {
                        t.rollback();
                    } catch (SQLException r) {
                        txErrors += 100;
                        System.err.println("rollback: " + r.getMessage());
                    }
                }
                Thread.sleep(5);
            }
            int id;
            try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT @@server_id")) {
                rs.next();
                id = rs.getInt(1);
            }
            System.out.println("OK " + writerErrors + " " + txErrors + " " + id + " "
                + (c.isValid(2) && t.isValid(2)));
        } catch (SQLException e) {
            e.printStackTrace(System.out);
            System.out.println("FAILED");
            System.exit(1);
        }
    }
}
