"""TLS clients through dbproxy: PyMySQL verifying the certificate, a user whose password is
checked in clear text (PyMySQL switched to mysql_clear_password; mysql-connector-python's
caching_sha2_password full authentication, binary protocol), and that user refused without
TLS. Prints "OK <checks>" or raises.

python tls_clients.py <required-port> <optional-port> <ca.pem>
"""
import sys

import mysql.connector
import pymysql

required, optional, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
checks = 0


def one(conn, sql, args=None):
    cur = conn.cursor()
    cur.execute(sql, args)
    row = cur.fetchone()
    cur.close()
    return row


# PyMySQL with the CA: the certificate is verified (name: 127.0.0.1, an IP SAN).
c = pymysql.connect(host="127.0.0.1", port=required, user="app", password="app-secret",
                    database="shop", ssl={"ca": ca, "check_hostname": True})
assert c._sock.version() in ("TLSv1.2", "TLSv1.3"), c._sock.version()
assert one(c, "SELECT %s", ("pymysql",)) == ("pymysql",)
c.close()
checks += 1

# The clear-text user: PyMySQL offers mysql_native_password and is switched.
c = pymysql.connect(host="127.0.0.1", port=required, user="clear", password="clear-secret",
                    ssl={"ca": ca})
assert one(c, "SELECT 'clear'") == ("clear",)
c.close()
checks += 1

# mysql-connector-python offering caching_sha2_password: asked for full authentication,
# it sends the password over TLS; then a prepared statement (binary protocol).
c = mysql.connector.connect(host="127.0.0.1", port=required, user="clear",
                            password="clear-secret", ssl_ca=ca, ssl_verify_cert=True,
                            auth_plugin="caching_sha2_password", use_pure=True)
cur = c.cursor(prepared=True)
cur.execute("SELECT ? + 1", (41,))
assert cur.fetchone() == (42,)
c.close()
checks += 1

# Without TLS the clear-text user is refused (3159), and nothing is sent in clear.
try:
    pymysql.connect(host="127.0.0.1", port=optional, user="clear", password="clear-secret")
    raise SystemExit("the clear-text user logged in without TLS")
except pymysql.err.OperationalError as e:
    assert e.args[0] == 3159, e
checks += 1

# A wrong password over TLS is an ordinary access denied.
try:
    pymysql.connect(host="127.0.0.1", port=required, user="clear", password="nope",
                    ssl={"ca": ca})
    raise SystemExit("a wrong password logged in")
except pymysql.err.OperationalError as e:
    assert e.args[0] == 1045, e
checks += 1

print(f"OK {checks}")
