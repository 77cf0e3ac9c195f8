"use strict";
// A database client (rows in fawkes_inbox / fawkes_outbox) and phoenix.js clients in one room, and
// fawkes_events rows streamed to phoenix.js with replay from last_event_id, across a restart.
const { describe, test, after } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { execFileSync } = require("node:child_process");
const server = require("../lib/server");
const c = require("../lib/client");

after(async () => {
  await c.disconnectAll();
  await server.stopAll();
});

function tempDb() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "fawkes-js-db-"));
  return path.join(dir, "test.db");
}

/** Runs SQL against the SQLite file with the sqlite3 command-line shell; returns its output. */
function sql(file, statement) {
  return execFileSync("sqlite3", ["-cmd", ".timeout 5000", file, statement], { encoding: "utf8" }).trim();
}

function quote(s) {
  return `'${s.replace(/'/g, "''")}'`;
}

/** Waits until `query` prints something other than nothing, polling the file (the database has no push). */
async function rowAppears(file, query, what, timeoutMs = 10000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const out = sql(file, query);
    if (out) return out;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

c.forEachTransport((transport) => {
  describe("database client", () => {
    test("chats with a phoenix.js client through fawkes_inbox and fawkes_outbox", async () => {
      const file = tempDb();
      const srv = await server.start({ args: ["--database", `sqlite://${file}`] });
      const socket = await c.connect(srv, { transport });
      const topic = c.uniqueTopic("room:db");
      const room = socket.channel(topic, { user: "js" });
      await c.join(room);

      const inbox = (frame) =>
        sql(file, `INSERT INTO fawkes_inbox (client_id, frame) VALUES ('row-client', ${quote(JSON.stringify(frame))})`);
      const heard = c.waitForEvent(room, "new_msg", { predicate: (p) => p.user === "sql" });
      inbox(["1", "1", topic, "phx_join", { user: "sql" }]);
      inbox(["1", "2", topic, "new_msg", { body: "written as a row" }]);
      assert.deepEqual(await heard, { body: "written as a row", user: "sql" });

      await c.pushOk(room, "new_msg", { body: "read as a row" });
      const expected = JSON.stringify([null, null, topic, "new_msg", { body: "read as a row", user: "js" }]);
      await rowAppears(
        file,
        `SELECT id FROM fawkes_outbox WHERE client_id = 'row-client' AND frame = ${quote(expected)}`,
        "the broadcast in the outbox"
      );
      const first = sql(file, "SELECT frame FROM fawkes_outbox WHERE client_id = 'row-client' ORDER BY id LIMIT 1");
      assert.deepEqual(JSON.parse(first), ["1", "1", topic, "phx_reply", { response: {}, status: "ok" }]);
    });
  });

  describe("table stream", () => {
    test("rows reach phoenix.js, and last_event_id replays across a server restart", async () => {
      const file = tempDb();
      const srv = await server.start({ args: ["--database", `sqlite://${file}`] });
      const socket = await c.connect(srv, { transport });
      const topic = c.uniqueTopic("room:feed");
      const room = socket.channel(topic, {});
      await c.join(room);
      const insert = (n) =>
        Number(sql(file, `INSERT INTO fawkes_events (topic, event, payload) VALUES (${quote(topic)}, 'tick', '{"n":${n}}') RETURNING id`));

      const first = c.waitForEvent(room, "tick");
      const id1 = insert(1);
      assert.deepEqual(await first, { id: id1, data: { n: 1 } });

      await srv.kill();
      const id2 = insert(2);
      const id3 = insert(3);
      const srv2 = await srv.restart({ args: ["--database", `sqlite://${file}`] });
      const socket2 = await c.connect(srv2, { transport });
      const resumed = socket2.channel(topic, { last_event_id: id1 });
      const seen = [];
      const both = new Promise((resolve) =>
        resumed.on("tick", (payload) => {
          seen.push(payload.id);
          if (seen.length === 3) resolve();
        })
      );
      await c.join(resumed);
      const id4 = insert(4);
      await c.withTimeout(both, c.DEFAULT_TIMEOUT_MS, "replayed and live rows");
      assert.deepEqual(seen, [id2, id3, id4], "replay from the database, then live, once each");
    });
  });
});
