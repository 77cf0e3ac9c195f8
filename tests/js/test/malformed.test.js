"use strict";
// Malformed frames close that one socket with 1011 and no reply; other sockets are untouched.

const { describe, it, before, after, afterEach } = require("node:test");
const assert = require("node:assert/strict");
const server = require("../lib/server");
const c = require("../lib/client");

let srv;
let bystander;
let bystanderTopic;
let bystanderRef = 100;

before(async () => {
  srv = await server.start();
});
afterEach(c.disconnectAll);
after(server.stopAll);

/** A second, well-behaved socket joined to a room, opened before the misbehaving one. */
async function ensureBystander() {
  bystander = await c.RawSocket.open(srv);
  bystanderTopic = c.uniqueTopic("room");
  await bystander.call("1", "1", bystanderTopic, "phx_join", {});
  return bystander;
}

/** The bystander socket still answers a push. */
async function assertBystanderAlive() {
  const ref = String(++bystanderRef);
  assert.equal(bystander.closeInfo, null, `the bystander socket was closed: ${JSON.stringify(bystander.closeInfo)}`);
  assert.deepEqual(await bystander.call("1", ref, bystanderTopic, "ping", { alive: ref }), [
    "1",
    ref,
    bystanderTopic,
    "phx_reply",
    { status: "ok", response: { alive: ref } },
  ]);
}

const cases = [
  { name: "V2: invalid JSON", query: { vsn: "2.0.0" }, frame: "{not json" },
  { name: "V2: array of 4 elements", query: { vsn: "2.0.0" }, frame: JSON.stringify([null, "1", "phoenix", "heartbeat"]) },
  { name: "V2: empty array", query: { vsn: "2.0.0" }, frame: "[]" },
  {
    name: "V2: an object (V1 form)",
    query: { vsn: "2.0.0" },
    frame: JSON.stringify({ topic: "phoenix", event: "heartbeat", payload: {}, ref: "1" }),
  },
  { name: "V2: a bare string", query: { vsn: "2.0.0" }, frame: JSON.stringify("hello") },
  { name: "V2: a number", query: { vsn: "2.0.0" }, frame: "42" },
  { name: "V2: truncated binary frame", query: { vsn: "2.0.0" }, frame: Buffer.from([0, 5, 5]), binary: true },
  {
    name: "V2: binary frame of unknown kind",
    query: { vsn: "2.0.0" },
    frame: Buffer.from([9, 0, 0, 0, 0]),
    binary: true,
  },
  { name: "V1: invalid JSON", query: { vsn: "1.0.0" }, frame: "][" },
  { name: "V1: a V2 array", query: { vsn: "1.0.0" }, frame: JSON.stringify([null, "1", "phoenix", "heartbeat", {}]) },
  { name: "V1: a binary frame", query: { vsn: "1.0.0" }, frame: Buffer.from([0, 0, 1, 7, 9]), binary: true },
];

describe("malformed frames", () => {
  for (const tc of cases) {
    it(`${tc.name} closes that socket with 1011, no reply, others untouched`, async () => {
      await ensureBystander();
      const raw = await c.RawSocket.open(srv, { query: tc.query });
      const before = raw.frames.length;
      raw.sendRaw(tc.frame, { binary: !!tc.binary });
      const info = await c.withTimeout(raw.closed, 5000, `the server to close the socket after: ${tc.name}`);
      assert.equal(info.code, 1011, `close code after ${tc.name}`);
      assert.equal(raw.frames.length, before, `frames answered to the malformed frame: ${raw.dump()}`);
      await assertBystanderAlive();
    });
  }

  it("a socket on the same topic as a misbehaving one keeps receiving broadcasts", async () => {
    await ensureBystander();
    const bad = await c.RawSocket.open(srv);
    await bad.call("1", "1", bystanderTopic, "phx_join", { user: "bad" });
    bad.sendRaw("nope");
    assert.equal((await bad.closed).code, 1011);
    const ref = String(++bystanderRef);
    bystander.send(["1", ref, bystanderTopic, "new_msg", { body: "still here" }]);
    const msg = await bystander.waitFrame(
      (f) => f.json && f.json[3] === "new_msg" && f.json[4].body === "still here",
      "the broadcast new_msg"
    );
    assert.deepEqual(msg.json, [null, null, bystanderTopic, "new_msg", { body: "still here", user: "anonymous" }]);
    assert.deepEqual((await bystander.reply(ref))[4], { status: "ok", response: {} });
  });
});
