// A Connector/J batch of inserts with useBulkStmts=true (MariaDB's COM_STMT_BULK_EXECUTE
// when the server offers MARIADB_CLIENT_STMT_BULK_OPERATIONS), then the rows read back.
// Prints "OK <rows>" or the failure.
//
// java -cp <dir>:mariadb-java-client.jar BulkBatch <port> <rows> <password>

import java.sql.*;

public class BulkBatch {
    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        int n = Integer.parseInt(args[1]);
        String url = "jdbc:mariadb://127.0.0.1:" + port + "/shop?user=app&password=" + args[2]
            + "&useServerPrepStmts=true&useBulkStmts=true&connectTimeout=30000&socketTimeout=120000";
        try (Connection c = DriverManager.getConnection(url)) {
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO bulk (id, v) VALUES (?, ?)")) {
                for (int i = 0; i < n; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "row-é-" + i);
                    ps.addBatch();
                }
                ps.executeBatch();
            }
            try (Statement st = c.createStatement();
                 ResultSet rs = st.executeQuery("SELECT COUNT(*), SUM(id), MAX(v) FROM bulk")) {
                rs.next();
                long count = rs.getLong(1);
                long sum = rs.getLong(2);
                long want = (long) n * (n - 1) / 2;
                if (count != n || sum != want) {
                    System.out.println("FAILED count " + count + " sum " + sum);
                    System.exit(1);
                }
            }
            System.out.println("OK " + n);
        } catch (SQLException e) {
            e.printStackTrace(System.out);
            System.out.println("FAILED");
            System.exit(1);
        }
    }
}
