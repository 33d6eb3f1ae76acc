// node-postgres through dbproxy: parameterized queries (unnamed statements), named prepared
// statements, transactions and an error mid-session, 8 clients at once.
// usage: node pg_client.js PORT PASSWORD
const { Client } = require('pg');

const [port, password] = process.argv.slice(2);
const CLIENTS = 8;
const ROUNDS = 100;

async function one(id) {
  const c = new Client({ host: '127.0.0.1', port: Number(port), user: 'app', password, database: 'shop' });
  await c.connect();
  await c.query(`SET application_name = 'node${id}'`);
  for (let r = 0; r < ROUNDS; r++) {
    const a = await c.query('SELECT $1::int + 1 AS v, current_setting($2) AS app', [r, 'application_name']);
    if (a.rows[0].v !== r + 1 || a.rows[0].app !== `node${id}`) throw new Error(`client ${id} round ${r}: ${JSON.stringify(a.rows[0])}`);
    const b = await c.query({ name: 'twice', text: 'SELECT $1::int * 2 AS v', values: [r] });
    if (b.rows[0].v !== r * 2) throw new Error(`client ${id} round ${r}: ${b.rows[0].v}`);
    await c.query('BEGIN');
    await c.query('INSERT INTO clients_log (client, round) VALUES ($1, $2)', [`node${id}`, r]);
    const n = await c.query('SELECT count(*)::int AS n FROM clients_log WHERE client = $1', [`node${id}`]);
    await c.query('COMMIT');
    if (n.rows[0].n !== r + 1) throw new Error(`client ${id} round ${r}: count ${n.rows[0].n}`);
    if (r % 25 === 0) {
      try {
        await c.query('SELECT 1 / $1::int', [0]);
        throw new Error('division by zero passed');
      } catch (e) {
        if (e.code !== '22012') throw e;
      }
    }
  }
  await c.end();
}

Promise.all(Array.from({ length: CLIENTS }, (_, i) => one(i)))
  .then(() => console.log(`node-postgres: ${CLIENTS} clients x ${ROUNDS} rounds ok`))
  .catch((e) => { console.error(e); process.exit(1); });
