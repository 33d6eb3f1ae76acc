// Connector/J's Statement.setQueryTimeout: the driver opens a second connection and sends
// KILL QUERY with the id of the first one's greeting. Prints "OK <ms>" when the statement
// stopped with a timeout, or the failure.
//
// java -cp <dir>:mariadb-java-client.jar QueryTimeout <port> <password>

import java.sql.*;

public class QueryTimeout {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:mariadb://127.0.0.1:" + args[0] + "/shop?user=app&password=" + args[1]
            + "&connectTimeout=30000&socketTimeout=120000";
        try (Connection c = DriverManager.getConnection(url);
             Statement st = c.createStatement()) {
            st.setQueryTimeout(1);
            long t0 = System.nanoTime();
            try {
                st.executeQuery("SELECT SLEEP(60)");
                System.out.println("FAILED: no timeout");
                System.exit(1);
            } catch (SQLTimeoutException e) {
                long ms = (System.nanoTime() - t0) / 1_000_000;
                // The connection goes on.
                try (ResultSet rs = st.executeQuery("SELECT 7")) {
                    rs.next();
                    if (rs.getInt(1) != 7) {
                        System.out.println("FAILED: after the timeout");
                        System.exit(1);
                    }
                }
                System.out.println("OK " + ms);
            }
        } catch (SQLException e) {
            e.printStackTrace(System.out);
            System.out.println("FAILED");
            System.exit(1);
        }
    }
}
