"""PostgreSQL drivers through dbproxy: asyncpg (prepares every statement, uses Flush) and
psycopg 3 (server-side prepared statements, pipeline mode), many clients at once.

usage: pg_clients.py PORT PASSWORD
Prints one line per driver with what it checked; any wrong value or error fails the run.
"""

import asyncio
import sys
import threading

import asyncpg
import psycopg

PORT = int(sys.argv[1])
PASSWORD = sys.argv[2]
DSN = f"postgresql://app:{PASSWORD}@127.0.0.1:{PORT}/shop?sslmode=disable"
CLIENTS = 12
ROUNDS = 60


async def asyncpg_client(i):
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f"SET application_name = 'apg{i}'")
        stmt = await conn.prepare("SELECT $1::int * 2, current_setting('application_name')")
        for r in range(ROUNDS):
            v = await conn.fetchval("SELECT $1::int + 1", r)
            assert v == r + 1, (i, r, v)
            row = await stmt.fetchrow(i * 1000 + r)
            assert row[0] == (i * 1000 + r) * 2 and row[1] == f"apg{i}", (i, r, row)
            async with conn.transaction():
                await conn.execute("INSERT INTO clients_log (client, round) VALUES ($1, $2)", f"apg{i}", r)
                n = await conn.fetchval("SELECT count(*) FROM clients_log WHERE client = $1", f"apg{i}")
                assert n == r + 1, (i, r, n)
            # An error in an extended-protocol exchange, then the session goes on.
            try:
                await conn.fetchval("SELECT 1 / $1::int", 0)
                raise AssertionError("division by zero passed")
            except asyncpg.exceptions.DivisionByZeroError:
                pass
    finally:
        await conn.close()


async def asyncpg_all():
    await asyncio.gather(*(asyncpg_client(i) for i in range(CLIENTS)))


def psycopg_client(i, errors):
    try:
        # prepare_threshold=0: every statement is prepared on the server (named).
        with psycopg.connect(DSN, prepare_threshold=0, autocommit=True) as conn:
            conn.execute(f"SET TimeZone = 'Etc/GMT-{i % 12}'")
            for r in range(ROUNDS):
                cur = conn.execute("SELECT %s::int + %s::int, current_setting('TimeZone')", (r, i))
                v, tz = cur.fetchone()
                assert v == r + i and tz == f"Etc/GMT-{i % 12}", (i, r, v, tz)
                # Pipeline mode: several statements before one Sync.
                with conn.pipeline():
                    c1 = conn.execute("INSERT INTO clients_log (client, round) VALUES (%s, %s)", (f"pg{i}", r))
                    c2 = conn.execute("SELECT count(*) FROM clients_log WHERE client = %s", (f"pg{i}",))
                    c3 = conn.execute("SELECT %s::text", (f"x{i}",))
                assert c2.fetchone()[0] == r + 1, (i, r)
                assert c3.fetchone()[0] == f"x{i}", (i, r)
                with conn.transaction():
                    conn.execute("SELECT pg_catalog.txid_current()")
                    got = conn.execute("SELECT %s::int", (r,)).fetchone()[0]
                    assert got == r, (i, r, got)
    except Exception as e:  # noqa: BLE001 - reported to the main thread
        errors.append(f"psycopg client {i}: {e!r}")


def main():
    asyncio.run(asyncpg_all())
    print(f"asyncpg: {CLIENTS} clients x {ROUNDS} rounds ok")
    errors = []
    threads = [threading.Thread(target=psycopg_client, args=(i, errors)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print("\n".join(errors), file=sys.stderr)
        sys.exit(1)
    print(f"psycopg: {CLIENTS} clients x {ROUNDS} rounds ok")


main()
