// Connector/J over TLS through dbproxy, the server certificate verified against the test CA
// (host name included): server-side prepared statements and a transaction. Prints "OK <n>".
//
// java -cp <dir>:mariadb-java-client.jar TlsClient <port> <ca.pem>

import java.sql.*;

public class TlsClient {
    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        String url = "jdbc:mariadb://127.0.0.1:" + port + "/shop?user=app&password=app-secret"
            + "&useSsl=true&serverSslCert=" + args[1]
            + "&useServerPrepStmts=true&connectTimeout=30000&socketTimeout=60000";
        int n = 0;
        try (Connection c = DriverManager.getConnection(url)) {
            try (PreparedStatement ps = c.prepareStatement("SELECT ? * 2")) {
                for (int i = 0; i < 50; i++) {
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        if (rs.getInt(1) != i * 2) throw new RuntimeException("wrong answer " + i);
                        n++;
                    }
                }
            }
            c.setAutoCommit(false);
            try (Statement st = c.createStatement()) {
                st.execute("CREATE TEMPORARY TABLE t (v INT)");
                st.execute("INSERT INTO t VALUES (1), (2)");
                try (ResultSet rs = st.executeQuery("SELECT SUM(v) FROM t")) {
                    rs.next();
                    if (rs.getInt(1) != 3) throw new RuntimeException("wrong sum");
                    n++;
                }
            }
            c.commit();
        }
        System.out.println("OK " + n);
    }
}
