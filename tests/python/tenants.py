"""Two tenants of one dbproxy user, each in its own database, prepare the same statement with
mysql-connector-python's binary protocol (cursor(prepared=True)); a third client holds a
backend connection now and then so that the tenants move between connections. Each tenant
must read only its own rows. Prints "OK <rounds>" or the first leak.

python tenants.py <port> <rounds>
"""
import sys
import mysql.connector

port, rounds = int(sys.argv[1]), int(sys.argv[2])


def connect(db):
    return mysql.connector.connect(host="127.0.0.1", port=port, user="app",
                                   password="app-secret", database=db, autocommit=True)


tenants = [(connect("tenant1"), "t1"), (connect("tenant2"), "t2")]
holder = connect("tenant1")
cursors = [(c.cursor(prepared=True), want) for c, want in tenants]
for r in range(rounds):
    hold = r % 3 == 0
    if hold:
        h = holder.cursor()
        h.execute("BEGIN")
        h.execute("SELECT 1")
        h.fetchall()
    order = cursors if r % 2 == 0 else list(reversed(cursors))
    for cur, want in order:
        cur.execute("SELECT owner FROM orders WHERE id = ?", (1 + r % 3,))
        rows = cur.fetchall()
        owner = rows[0][0] if rows else None
        if owner is None or not owner.endswith(want):
            print(f"LEAK round {r}: tenant {want} read {owner!r}")
            sys.exit(1)
    if hold:
        h.execute("COMMIT")
        h.close()
print(f"OK {rounds}")
