"use strict";
// Core channel scenarios through the official phoenix client, once per transport
// (FAWKES_TRANSPORTS) and once per serializer (V2, V1).

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

c.forEachTransport((transport) => {
  c.forEachSerializer((serializer) => {
    const opts = (extra = {}) => ({ transport, serializer, ...extra });

    describe("join", () => {
      it("joins a room with an ok {} reply", async () => {
        const socket = await c.connect(srv, opts());
        const channel = socket.channel(c.uniqueTopic("room"), { user: "alice" });
        assert.deepEqual(await c.joinResult(channel), { status: "ok", response: {} });
        assert.equal(channel.state, "joined");
      });

      it("admin:x is refused with {reason: unauthorized} and receive('error') fires", async () => {
        const socket = await c.connect(srv, opts());
        const channel = socket.channel("admin:x");
        const result = await c.joinResult(channel);
        c.abandon(channel);
        assert.deepEqual(result, { status: "error", response: { reason: "unauthorized" } });
      });

      it("an unmatched topic is refused with {reason: unmatched topic}", async () => {
        const socket = await c.connect(srv, opts());
        const channel = socket.channel("nope:1");
        const result = await c.joinResult(channel);
        c.abandon(channel);
        assert.deepEqual(result, { status: "error", response: { reason: "unmatched topic" } });
      });

      it("test: join replies topic, token (null without authToken) and connect params", async () => {
        const socket = await c.connect(srv, opts({ params: { user: "bob", color: "blue" } }));
        const topic = c.uniqueTopic("test");
        const response = await c.join(socket.channel(topic, { some: "param" }));
        assert.equal(response.topic, topic);
        assert.equal(response.token, null);
        assert.equal(typeof response.params, "object");
        assert.equal(response.params.user, "bob");
        assert.equal(response.params.color, "blue");
      });

      it("a join refused by the channel carries the requested reason", async () => {
        const socket = await c.connect(srv, opts());
        const channel = socket.channel(c.uniqueTopic("test"), { refuse: "go away" });
        const result = await c.joinResult(channel);
        c.abandon(channel);
        assert.deepEqual(result, { status: "error", response: { reason: "go away" } });
      });

      it("a join that panics is answered with {reason: join crashed}", async () => {
        const socket = await c.connect(srv, opts());
        const channel = socket.channel(c.uniqueTopic("test"), { crash: true });
        const result = await c.joinResult(channel);
        c.abandon(channel);
        assert.deepEqual(result, { status: "error", response: { reason: "join crashed" } });
        // The socket survives a crashing join: another join on it still works.
        await c.join(socket.channel(c.uniqueTopic("test")));
      });
    });

    describe("push and reply", () => {
      it("echo replies ok with the payload unchanged", async () => {
        const socket = await c.connect(srv, opts());
        const channel = socket.channel(c.uniqueTopic("test"));
        await c.join(channel);
        const payload = { a: 1, nested: { list: [1, "two", null, true] }, s: "héllo ✓" };
        assert.deepEqual(await c.push(channel, "echo", payload), { status: "ok", response: payload });
      });

      it("error_reply replies error {reason: requested}", async () => {
        const socket = await c.connect(srv, opts());
        const channel = socket.channel(c.uniqueTopic("test"));
        await c.join(channel);
        assert.deepEqual(await c.push(channel, "error_reply", {}), {
          status: "error",
          response: { reason: "requested" },
        });
      });

      it("an unknown event replies error {reason: unknown event}", async () => {
        const socket = await c.connect(srv, opts());
        const test = socket.channel(c.uniqueTopic("test"));
        const room = socket.channel(c.uniqueTopic("room"));
        await Promise.all([c.join(test), c.join(room)]);
        const expected = { status: "error", response: { reason: "unknown event" } };
        assert.deepEqual(await c.push(test, "no_such_event", {}), expected);
        assert.deepEqual(await c.push(room, "no_such_event", {}), expected);
      });

      it("room ping replies ok with the payload unchanged", async () => {
        const socket = await c.connect(srv, opts());
        const room = socket.channel(c.uniqueTopic("room"));
        await c.join(room);
        assert.deepEqual(await c.push(room, "ping", { x: [1, 2] }), { status: "ok", response: { x: [1, 2] } });
      });

      it("noreply gets no reply (proved by the reply to a later push)", async () => {
        const socket = await c.connect(srv, opts());
        const channel = socket.channel(c.uniqueTopic("test"));
        await c.join(channel);
        const seen = c.recordMessages(socket);
        const silent = channel.push("noreply", {}, 3000);
        const silentRef = silent.ref;
        assert.ok(silentRef, "the noreply push should have been sent at once");
        let silentAnswered = false;
        silent.receive("ok", () => (silentAnswered = true)).receive("error", () => (silentAnswered = true));
        assert.deepEqual(await c.push(channel, "echo", { after: true }), { status: "ok", response: { after: true } });
        const stray = seen.filter((m) => m.ref === silentRef);
        assert.deepEqual(stray, [], `the noreply push (ref ${silentRef}) was answered: ${c.safeJson(stray)}`);
        assert.equal(silentAnswered, false);
      });

      it("1,000 pushes in a burst are all answered, in order", { timeout: 60000 }, async () => {
        const socket = await c.connect(srv, opts());
        const channel = socket.channel(c.uniqueTopic("test"));
        await c.join(channel);
        const N = 1000;
        const order = [];
        const replies = [];
        for (let i = 0; i < N; i++) {
          replies.push(
            new Promise((resolve, reject) => {
              channel
                .push("echo", { i }, 30000)
                .receive("ok", (resp) => {
                  order.push(resp.i);
                  resolve();
                })
                .receive("error", (resp) => reject(new Error(`push ${i} answered error ${c.safeJson(resp)}`)))
                .receive("timeout", () => reject(new Error(`push ${i} timed out (${order.length} answered)`)));
            })
          );
        }
        await c.withTimeout(Promise.all(replies), 40000, `${N} echo replies`);
        assert.equal(order.length, N);
        const outOfOrder = order.findIndex((v, idx) => v !== idx);
        assert.equal(outOfOrder, -1, `reply #${outOfOrder} carried i=${order[outOfOrder]}`);
      });
    });

    describe("broadcast", () => {
      it("room new_msg reaches every subscriber, the sender included", async () => {
        const topic = c.uniqueTopic("room");
        const a = await c.connect(srv, opts());
        const b = await c.connect(srv, opts());
        const ca = a.channel(topic, { user: "alice" });
        const cb = b.channel(topic, { user: "bob" });
        await Promise.all([c.join(ca), c.join(cb)]);
        const gotA = c.waitForEvent(ca, "new_msg");
        const gotB = c.waitForEvent(cb, "new_msg");
        assert.deepEqual(await c.push(ca, "new_msg", { body: "hello" }), { status: "ok", response: {} });
        assert.deepEqual(await gotA, { body: "hello", user: "alice" });
        assert.deepEqual(await gotB, { body: "hello", user: "alice" });
      });

      it("a room join without a user broadcasts as anonymous", async () => {
        const socket = await c.connect(srv, opts());
        const room = socket.channel(c.uniqueTopic("room"));
        await c.join(room);
        const got = c.waitForEvent(room, "new_msg");
        await c.pushOk(room, "new_msg", { body: "who am i" });
        assert.deepEqual(await got, { body: "who am i", user: "anonymous" });
      });

      it("broadcast goes to every subscriber, the sender included", async () => {
        const topic = c.uniqueTopic("test");
        const a = await c.connect(srv, opts());
        const b = await c.connect(srv, opts());
        const ca = a.channel(topic);
        const cb = b.channel(topic);
        await Promise.all([c.join(ca), c.join(cb)]);
        const gotA = c.waitForEvent(ca, "shout");
        const gotB = c.waitForEvent(cb, "shout");
        assert.deepEqual(await c.push(ca, "broadcast", { event: "shout", payload: { n: 1 } }), {
          status: "ok",
          response: {},
        });
        assert.deepEqual(await gotA, { n: 1 });
        assert.deepEqual(await gotB, { n: 1 });
      });

      it("broadcast_from excludes the sender", async () => {
        const topic = c.uniqueTopic("test");
        const a = await c.connect(srv, opts());
        const b = await c.connect(srv, opts());
        const ca = a.channel(topic);
        const cb = b.channel(topic);
        await Promise.all([c.join(ca), c.join(cb)]);
        const seenA = c.record(ca, ["whisper", "marker"]);
        const gotB = c.waitForEvent(cb, "whisper");
        await c.pushOk(ca, "broadcast_from", { event: "whisper", payload: { n: 2 } });
        assert.deepEqual(await gotB, { n: 2 });
        // A broadcast sent after it reaches the sender too; by then the whisper would have come.
        const marker = c.waitForEvent(ca, "marker");
        await c.pushOk(ca, "broadcast", { event: "marker", payload: {} });
        await marker;
        assert.deepEqual(
          seenA.map((e) => e.event),
          ["marker"],
          `the sender received its own broadcast_from: ${c.safeJson(seenA)}`
        );
      });

      it("a server push reaches only the socket that asked", async () => {
        const topic = c.uniqueTopic("test");
        const a = await c.connect(srv, opts());
        const b = await c.connect(srv, opts());
        const ca = a.channel(topic);
        const cb = b.channel(topic);
        await Promise.all([c.join(ca), c.join(cb)]);
        const seenB = c.record(cb, ["only_you", "marker"]);
        const gotA = c.waitForEvent(ca, "only_you");
        await c.pushOk(ca, "push", { event: "only_you", payload: { secret: 42 } });
        assert.deepEqual(await gotA, { secret: 42 });
        const markerB = c.waitForEvent(cb, "marker");
        await c.pushOk(ca, "broadcast", { event: "marker", payload: {} });
        await markerB;
        assert.deepEqual(
          seenB.map((e) => e.event),
          ["marker"],
          `another socket received the push: ${c.safeJson(seenB)}`
        );
      });
    });

    describe("leave and stop", () => {
      it("leave: ok reply, onClose fires, the server sends phx_close, later pushes get unmatched topic", async () => {
        const socket = await c.connect(srv, opts());
        const topic = c.uniqueTopic("test");
        const channel = socket.channel(topic);
        await c.join(channel);
        const joinRef = channel.joinRef();
        const closed = new Promise((resolve) => channel.onClose(resolve));
        const serverClose = c.waitForMessage(
          socket,
          (m) => m.topic === topic && m.event === "phx_close",
          `phx_close for ${topic}`
        );
        assert.deepEqual(await c.pushResult(channel.leave(), "the leave reply"), { status: "ok", response: {} });
        await c.withTimeout(closed, 2000, "channel.onClose after leave");
        const close = await serverClose;
        assert.equal(close.ref, joinRef, "phx_close must carry the join's ref as ref");
        if (serializer.name === "V2") assert.equal(close.join_ref, joinRef, "phx_close join_ref");
        assert.deepEqual(close.payload, {});

        // A push carrying the old join_ref, sent by hand since the channel is gone.
        const ref = socket.makeRef();
        const reply = c.waitForMessage(socket, (m) => m.ref === ref, `the reply to ref ${ref}`);
        socket.push({ topic, event: "echo", payload: {}, ref, join_ref: joinRef });
        const msg = await reply;
        assert.equal(msg.event, "phx_reply");
        assert.deepEqual(msg.payload, { status: "error", response: { reason: "unmatched topic" } });
        assert.ok(msg.join_ref == null, `unmatched topic reply must have join_ref null, got ${msg.join_ref}`);
      });

      it("stop: ok reply, then the server closes the channel (phx_close, onClose)", async () => {
        const socket = await c.connect(srv, opts());
        const channel = socket.channel(c.uniqueTopic("test"));
        await c.join(channel);
        const order = [];
        const closed = new Promise((resolve) =>
          channel.onClose(() => {
            order.push("close");
            resolve();
          })
        );
        // Record the order in the receive callback itself: a promise continuation would run after
        // both frames when they arrive in one TCP read.
        const stop = channel.push("stop", {});
        stop.receive("ok", () => order.push("reply"));
        assert.deepEqual(await c.pushResult(stop, "the reply to stop"), { status: "ok", response: {} });
        await c.withTimeout(closed, 5000, "onClose after stop");
        assert.deepEqual(order, ["reply", "close"]);
        assert.equal(channel.state, "closed");
      });
    });

    describe("crash", () => {
      it("a crashing channel gets phx_error, the client rejoins, the other topic keeps working", { timeout: 20000 }, async () => {
        const socket = await c.connect(srv, opts());
        const crashing = socket.channel(c.uniqueTopic("test"));
        const other = socket.channel(c.uniqueTopic("test"));
        const joins = c.countJoins(crashing);
        await Promise.all([c.join(crashing), c.join(other)]);
        const otherEvents = c.record(other, ["phx_error", "phx_close"]);
        const errored = c.waitForEvent(crashing, "phx_error");

        crashing.push("crash", {}, 3000);
        await errored;
        // The other topic still answers while the crashed one is waiting to rejoin.
        assert.deepEqual(await c.push(other, "echo", { still: "here" }), {
          status: "ok",
          response: { still: "here" },
        });
        await joins.until(2, { timeout: 10000 });
        assert.deepEqual(await c.push(crashing, "echo", { back: true }), { status: "ok", response: { back: true } });
        assert.deepEqual(await c.push(other, "echo", { n: 2 }), { status: "ok", response: { n: 2 } });
        assert.deepEqual(otherEvents, [], `the other topic got ${c.safeJson(otherEvents)}`);
      });
    });
  });
});
