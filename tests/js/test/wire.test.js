"use strict";
// Wire-level checks with raw WebSocket frames (the `ws` package), V2 and V1 JSON.

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

const OK = (response = {}) => ({ status: "ok", response });
const ERR = (reason) => ({ status: "error", response: { reason } });

/** Index of the first JSON frame matching pred, or -1. */
function indexOf(raw, pred) {
  return raw.frames.findIndex((f) => !f.binary && f.json !== undefined && pred(f.json));
}

describe("V2 raw frames", () => {
  it("join reply echoes join_ref and ref", async () => {
    const raw = await c.RawSocket.open(srv);
    const topic = c.uniqueTopic("room");
    assert.deepEqual(await raw.call("1", "1", topic, "phx_join", { user: "raw" }), ["1", "1", topic, "phx_reply", OK()]);
  });

  it("refused join keeps its join_ref; unmatched topic join has join_ref null", async () => {
    const raw = await c.RawSocket.open(srv);
    assert.deepEqual(await raw.call("3", "3", "admin:x", "phx_join", {}), [
      "3",
      "3",
      "admin:x",
      "phx_reply",
      ERR("unauthorized"),
    ]);
    assert.deepEqual(await raw.call("4", "4", "nope:1", "phx_join", {}), [
      null,
      "4",
      "nope:1",
      "phx_reply",
      ERR("unmatched topic"),
    ]);
  });

  it("push to a topic never joined: unmatched topic, join_ref null", async () => {
    const raw = await c.RawSocket.open(srv);
    const topic = c.uniqueTopic("room");
    assert.deepEqual(await raw.call("7", "8", topic, "ping", { a: 1 }), [
      null,
      "8",
      topic,
      "phx_reply",
      ERR("unmatched topic"),
    ]);
  });

  it("push reply carries the push's join_ref and ref", async () => {
    const raw = await c.RawSocket.open(srv);
    const topic = c.uniqueTopic("test");
    await raw.call("1", "1", topic, "phx_join", {});
    assert.deepEqual(await raw.call("1", "2", topic, "echo", { x: "y" }), ["1", "2", topic, "phx_reply", OK({ x: "y" })]);
    assert.deepEqual(await raw.call("1", "3", topic, "error_reply", {}), ["1", "3", topic, "phx_reply", ERR("requested")]);
  });

  it("server push carries the join_ref and a null ref; broadcast has null join_ref and ref", async () => {
    const raw = await c.RawSocket.open(srv);
    const topic = c.uniqueTopic("test");
    await raw.call("1", "1", topic, "phx_join", {});
    await raw.call("1", "2", topic, "push", { event: "solo", payload: { p: 1 } });
    const pushed = await raw.waitFrame((f) => f.json && f.json[3] === "solo", "the solo push");
    assert.deepEqual(pushed.json, ["1", null, topic, "solo", { p: 1 }]);
    await raw.call("1", "3", topic, "broadcast", { event: "all", payload: { p: 2 } });
    const bc = await raw.waitFrame((f) => f.json && f.json[3] === "all", "the broadcast");
    assert.deepEqual(bc.json, [null, null, topic, "all", { p: 2 }]);
  });

  it("leave: ok reply, then phx_close with the join_ref as join_ref and ref; later pushes get unmatched topic", async () => {
    const raw = await c.RawSocket.open(srv);
    const topic = c.uniqueTopic("room");
    await raw.call("5", "5", topic, "phx_join", {});
    assert.deepEqual(await raw.call("5", "6", topic, "phx_leave", {}), ["5", "6", topic, "phx_reply", OK()]);
    const close = await raw.waitFrame((f) => f.json && f.json[3] === "phx_close", "phx_close");
    assert.deepEqual(close.json, ["5", "5", topic, "phx_close", {}]);
    assert.ok(
      indexOf(raw, (m) => m[1] === "6") < indexOf(raw, (m) => m[3] === "phx_close"),
      "the leave reply must come before phx_close"
    );
    assert.deepEqual(await raw.call("5", "7", topic, "ping", {}), [null, "7", topic, "phx_reply", ERR("unmatched topic")]);
  });

  it("leave of a topic never joined is answered ok", async () => {
    const raw = await c.RawSocket.open(srv);
    const topic = c.uniqueTopic("room");
    const reply = await raw.call("9", "9", topic, "phx_leave", {});
    assert.equal(reply[1], "9");
    assert.equal(reply[2], topic);
    assert.equal(reply[3], "phx_reply");
    assert.deepEqual(reply[4], OK());
  });

  it("duplicate join: new reply, then phx_close with the old join_ref; stale pushes are ignored", async () => {
    const raw = await c.RawSocket.open(srv);
    const topic = c.uniqueTopic("test");
    await raw.call("1", "1", topic, "phx_join", {});
    const second = await raw.call("2", "2", topic, "phx_join", {});
    assert.equal(second[0], "2");
    assert.equal(second[3], "phx_reply");
    assert.deepEqual(second[4].status, "ok");
    const close = await raw.waitFrame((f) => f.json && f.json[3] === "phx_close", "phx_close of the old join");
    assert.deepEqual(close.json, ["1", "1", topic, "phx_close", {}]);
    assert.ok(
      indexOf(raw, (m) => m[1] === "2") < indexOf(raw, (m) => m[3] === "phx_close"),
      `the new join's reply must come before phx_close; frames: ${raw.dump()}`
    );
    // A push with the old join_ref is ignored; one with the new join_ref is answered.
    raw.send(["1", "3", topic, "echo", { stale: true }]);
    assert.deepEqual(await raw.call("2", "4", topic, "echo", { fresh: true }), ["2", "4", topic, "phx_reply", OK({ fresh: true })]);
    assert.equal(indexOf(raw, (m) => m[1] === "3"), -1, `the stale push was answered; frames: ${raw.dump()}`);
  });

  it("heartbeat is answered on topic phoenix", async () => {
    const raw = await c.RawSocket.open(srv);
    assert.deepEqual(await raw.call(null, "h1", "phoenix", "heartbeat", {}), [null, "h1", "phoenix", "phx_reply", OK()]);
  });

  it("a numeric ref is echoed as given; a sixth element is ignored", async () => {
    const raw = await c.RawSocket.open(srv);
    raw.send([null, 7, "phoenix", "heartbeat", {}]);
    assert.deepEqual(await raw.reply(7), [null, 7, "phoenix", "phx_reply", OK()]);
    raw.send([null, "h6", "phoenix", "heartbeat", {}, "extra"]);
    assert.deepEqual(await raw.reply("h6"), [null, "h6", "phoenix", "phx_reply", OK()]);
  });

  it("[null,null,null,null,null] gets an unmatched topic reply and the socket stays open", async () => {
    const raw = await c.RawSocket.open(srv);
    raw.send([null, null, null, null, null]);
    const f = await raw.waitFrame((x) => x.json && x.json[3] === "phx_reply", "a reply to the all-null message");
    const [joinRef, ref, topic, event, payload] = f.json;
    assert.deepEqual([joinRef, ref, event, payload], [null, null, "phx_reply", ERR("unmatched topic")]);
    // Phoenix echoes the null topic; an empty string is tolerated (the client ignores it either way).
    assert.ok(topic === null || topic === "", `reply topic ${JSON.stringify(topic)}`);
    assert.deepEqual(await raw.call(null, "h2", "phoenix", "heartbeat", {}), [null, "h2", "phoenix", "phx_reply", OK()]);
  });
});

describe("V1 raw frames", () => {
  const v1 = (topic, event, payload, ref, join_ref) => JSON.stringify({ topic, event, payload, ref, join_ref });
  const byRef = (raw, ref) =>
    raw.waitFrame((f) => f.json && !Array.isArray(f.json) && f.json.ref === ref, `V1 frame with ref ${ref}`).then((f) => f.json);
  const strip = ({ topic, event, payload, ref }) => ({ topic, event, payload, ref });

  for (const query of [{ vsn: "1.0.0" }, {}]) {
    const label = query.vsn ? "vsn=1.0.0" : "no vsn";
    it(`${label}: join, push, leave and phx_close in the object form`, async () => {
      const raw = await c.RawSocket.open(srv, { query });
      const topic = c.uniqueTopic("test");
      raw.sendRaw(v1(topic, "phx_join", {}, "1", "1"));
      const joinReply = await byRef(raw, "1");
      assert.ok(!Array.isArray(joinReply), "V1 output must be objects");
      assert.deepEqual(strip(joinReply), { topic, event: "phx_reply", payload: OK(joinReply.payload.response), ref: "1" });
      assert.equal(joinReply.payload.response.topic, topic);

      raw.sendRaw(v1(topic, "echo", { v: 1 }, "2", "1"));
      assert.deepEqual(strip(await byRef(raw, "2")), { topic, event: "phx_reply", payload: OK({ v: 1 }), ref: "2" });

      raw.sendRaw(v1(topic, "broadcast", { event: "b", payload: { n: 1 } }, "3", "1"));
      const bc = await raw.waitFrame((f) => f.json && f.json.event === "b", "V1 broadcast");
      assert.deepEqual(strip(bc.json), { topic, event: "b", payload: { n: 1 }, ref: null });

      raw.sendRaw(v1(topic, "phx_leave", {}, "4", "1"));
      assert.deepEqual(strip(await byRef(raw, "4")), { topic, event: "phx_reply", payload: OK(), ref: "4" });
      const close = await raw.waitFrame((f) => f.json && f.json.event === "phx_close", "V1 phx_close");
      assert.deepEqual(strip(close.json), { topic, event: "phx_close", payload: {}, ref: "1" });

      // join_ref may be absent in V1 input.
      raw.sendRaw(JSON.stringify({ topic: "phoenix", event: "heartbeat", payload: {}, ref: "5" }));
      assert.deepEqual(strip(await byRef(raw, "5")), { topic: "phoenix", event: "phx_reply", payload: OK(), ref: "5" });
    });
  }
});
