"use strict";
// Binary payloads in the V2 binary layout (WebSocket only: phoenix.js cannot decode binary over
// long-poll, see PROTOCOL.md section 4).

const { describe, it, before, after, afterEach } = require("node:test");
const assert = require("node:assert/strict");
const server = require("../lib/server");
const c = require("../lib/client");

let srv;
before(async () => {
  srv = await server.start();
});
afterEach(c.disconnectAll);
after(server.stopAll);

const BYTES = [1, 2, 3, 255];

describe("binary through the phoenix client (V2, websocket)", () => {
  it("a binary ping to a room is answered with the same bytes", async () => {
    const socket = await c.connect(srv, { transport: "websocket" });
    const room = socket.channel(c.uniqueTopic("room"));
    await c.join(room);
    const sent = [0, 1, 2, 0xfa, 0xff, 0x0a, 0x0d, 0x80, 0x7f];
    const { status, response } = await c.push(room, "ping", c.arrayBuffer(sent));
    assert.equal(status, "ok");
    assert.ok(response instanceof ArrayBuffer, `reply response should be an ArrayBuffer, got ${c.safeJson(response)}`);
    assert.deepEqual(c.bytes(response), sent);
  });

  it("an empty binary ping is answered with empty bytes", async () => {
    const socket = await c.connect(srv, { transport: "websocket" });
    const room = socket.channel(c.uniqueTopic("room"));
    await c.join(room);
    const { status, response } = await c.push(room, "ping", new ArrayBuffer(0));
    assert.equal(status, "ok");
    assert.ok(response instanceof ArrayBuffer);
    assert.equal(response.byteLength, 0);
  });

  it("binary_push arrives as an ArrayBuffer [1,2,3,255] on this socket", async () => {
    const socket = await c.connect(srv, { transport: "websocket" });
    const channel = socket.channel(c.uniqueTopic("test"));
    await c.join(channel);
    const got = c.waitForEvent(channel, "binary");
    assert.deepEqual(await c.push(channel, "binary_push", {}), { status: "ok", response: {} });
    const payload = await got;
    assert.ok(payload instanceof ArrayBuffer, `expected an ArrayBuffer, got ${c.safeJson(payload)}`);
    assert.deepEqual(c.bytes(payload), BYTES);
  });

  it("binary_broadcast reaches every subscriber as an ArrayBuffer [1,2,3,255]", async () => {
    const topic = c.uniqueTopic("test");
    const a = await c.connect(srv, { transport: "websocket" });
    const b = await c.connect(srv, { transport: "websocket" });
    const ca = a.channel(topic);
    const cb = b.channel(topic);
    await Promise.all([c.join(ca), c.join(cb)]);
    const gotA = c.waitForEvent(ca, "binary");
    const gotB = c.waitForEvent(cb, "binary");
    await c.pushOk(ca, "binary_broadcast", {});
    for (const payload of [await gotA, await gotB]) {
      assert.ok(payload instanceof ArrayBuffer, `expected an ArrayBuffer, got ${c.safeJson(payload)}`);
      assert.deepEqual(c.bytes(payload), BYTES);
    }
  });

  it("binary echo on a test channel", async () => {
    const socket = await c.connect(srv, { transport: "websocket" });
    const channel = socket.channel(c.uniqueTopic("test"));
    await c.join(channel);
    const { status, response } = await c.push(channel, "echo", c.arrayBuffer([9, 8, 7]));
    assert.equal(status, "ok");
    assert.deepEqual(c.bytes(response), [9, 8, 7]);
  });
});

describe("binary layout on the wire (raw frames)", () => {
  const enc = (s) => [...Buffer.from(s, "utf8")];

  it("the captured Phoenix example: push 00 01 01 08 04 … is answered 01 01 01 08 02 …", async () => {
    const raw = await c.RawSocket.open(srv);
    await raw.call("1", "1", "room:bin", "phx_join", {});
    const payload = [0x00, 0x01, 0x02, 0xfa, 0xff, 0x0a, 0x0d];
    const frame = Buffer.from([0, 1, 1, 8, 4, ...enc("1"), ...enc("3"), ...enc("room:bin"), ...enc("ping"), ...payload]);
    raw.sendRaw(frame, { binary: true });
    const reply = await raw.waitFrame((f) => f.binary, "a binary reply");
    assert.deepEqual(
      reply.data.toString("hex"),
      Buffer.from([1, 1, 1, 8, 2, ...enc("1"), ...enc("3"), ...enc("room:bin"), ...enc("ok"), ...payload]).toString("hex")
    );
  });

  it("a server binary push is kind 0 with join_ref, topic, event sizes and no ref", async () => {
    const raw = await c.RawSocket.open(srv);
    const topic = "test:bin";
    await raw.call("12", "1", topic, "phx_join", {});
    assert.deepEqual((await raw.call("12", "2", topic, "binary_push", {}))[4], { status: "ok", response: {} });
    const f = await raw.waitFrame((x) => x.binary, "the binary push");
    assert.deepEqual(
      f.data.toString("hex"),
      Buffer.from([0, 2, 8, 6, ...enc("12"), ...enc(topic), ...enc("binary"), ...BYTES]).toString("hex")
    );
  });

  it("a binary broadcast is kind 2 with topic and event sizes", async () => {
    const raw = await c.RawSocket.open(srv);
    const topic = "test:binbc";
    await raw.call("1", "1", topic, "phx_join", {});
    assert.deepEqual((await raw.call("1", "2", topic, "binary_broadcast", {}))[4], { status: "ok", response: {} });
    const f = await raw.waitFrame((x) => x.binary, "the binary broadcast");
    assert.deepEqual(
      f.data.toString("hex"),
      Buffer.from([2, topic.length, 6, ...enc(topic), ...enc("binary"), ...BYTES]).toString("hex")
    );
  });

  it("a binary push to a topic never joined gets a JSON unmatched topic reply", async () => {
    const raw = await c.RawSocket.open(srv);
    const frame = Buffer.from([0, 1, 1, 9, 4, ...enc("1"), ...enc("5"), ...enc("room:none"), ...enc("ping"), 1, 2]);
    raw.sendRaw(frame, { binary: true });
    const reply = await raw.waitFrame((f) => !f.binary && Array.isArray(f.json) && f.json[1] === "5", "a reply to ref 5");
    assert.deepEqual(reply.json, [
      null,
      "5",
      "room:none",
      "phx_reply",
      { status: "error", response: { reason: "unmatched topic" } },
    ]);
  });
});
