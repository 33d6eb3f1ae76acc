"""Many PyMySQL clients, each with its own session: user variables of every type (an integer,
a decimal, a utf8mb4 string with non-ASCII characters, NULL), time_zone, sql_mode and
default database. All connect first, then query in turns; every value must be right on every
query. Prints "OK <queries>" or the first wrong value.

python uservars.py <port> <clients> <rounds>
"""
import sys
import threading
from decimal import Decimal

import pymysql

port, clients, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
barrier = threading.Barrier(clients)
failures = []
queries = [0]
lock = threading.Lock()


def client(i):
    try:
        db = "shop" if i % 2 == 0 else "shop2"
        c = pymysql.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                            database=db, autocommit=True, charset="utf8mb4")
        cur = c.cursor()
        name = f"Grüße-{i}-ß€"
        tz = f"+0{i % 10}:00"
        mode = "ANSI_QUOTES" if i % 3 == 0 else "NO_ENGINE_SUBSTITUTION"
        cur.execute("SET @i = %s, @d = %s, @s = %s, @n = NULL", (i, Decimal(f"{i}.25"), name))
        cur.execute(f"SET time_zone = '{tz}', sql_mode = '{mode}'")
        barrier.wait()
        want = (i, Decimal(f"{i}.25"), name, None, tz, mode, db)
        for r in range(rounds):
            cur.execute("SELECT @i, @d, @s, @n, @@time_zone, @@sql_mode, DATABASE()")
            got = cur.fetchone()
            if tuple(got) != want:
                raise AssertionError(f"client {i} round {r}: {got!r} != {want!r}")
            cur.execute("SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = DATABASE()")
            if cur.fetchone()[0] != 1:
                raise AssertionError(f"client {i}: default database lost")
            with lock:
                queries[0] += 2
        c.close()
    except Exception as e:  # noqa: BLE001 - reported as the test's failure
        with lock:
            failures.append(f"client {i}: {e!r}")
        barrier.abort()


threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if failures:
    print("FAILED", failures[0], f"({len(failures)} clients failed)")
    sys.exit(1)
print(f"OK {queries[0]}")
