"use strict";
// Connecting: vsn selection, refused connects, connect params and the 1.8 authToken.

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

const AUTH_PREFIX = "base64url.bearer.phx.";
const tokenProtocol = (token) => `${AUTH_PREFIX}${btoa(token).replace(/=/g, "")}`;

async function expectRefused(query, opts = {}) {
  const raw = new c.RawSocket(srv, { query, ...opts });
  const err = await c.withTimeout(
    raw.opened.then(
      () => null,
      (e) => e
    ),
    5000,
    `the upgrade answer for ${raw.url}`
  );
  assert.ok(err, `the upgrade of ${raw.url} was accepted, expected 403`);
  assert.equal(err.statusCode, 403, `expected HTTP 403 for ${raw.url}, got: ${err.message}`);
}

describe("raw WebSocket upgrade", () => {
  it("vsn=2.0.0 and vsn=1.0.0 are accepted", async () => {
    await c.RawSocket.open(srv, { query: { vsn: "2.0.0" } });
    await c.RawSocket.open(srv, { query: { vsn: "1.0.0" } });
  });

  it("vsn=3.0.0 is refused with HTTP 403", async () => {
    await expectRefused({ vsn: "3.0.0" });
  });

  it("reject=true in the connect params is refused with HTTP 403", async () => {
    await expectRefused({ vsn: "2.0.0", reject: "true" });
  });

  it("offered subprotocols phoenix + bearer token: the server picks phoenix", async () => {
    const raw = await c.RawSocket.open(srv, { protocols: ["phoenix", tokenProtocol("fawkes-test-token")] });
    assert.equal(raw.protocol, "phoenix");
    assert.deepEqual(await raw.call(null, "h", "phoenix", "heartbeat", {}), [
      null,
      "h",
      "phoenix",
      "phx_reply",
      { status: "ok", response: {} },
    ]);
  });

  it("the token from the subprotocol reaches the connect callback (test:whoami)", async () => {
    const raw = await c.RawSocket.open(srv, {
      query: { vsn: "2.0.0", user: "raw" },
      protocols: ["phoenix", tokenProtocol("s3cret!")],
    });
    assert.equal(raw.protocol, "phoenix");
    const reply = await raw.call("1", "1", "test:whoami", "phx_join", {});
    assert.equal(reply[4].status, "ok");
    assert.equal(reply[4].response.token, "s3cret!");
    assert.equal(reply[4].response.params.user, "raw");
  });
});

c.forEachTransport((transport) => {
  describe("phoenix client connect", () => {
    for (const token of ["fawkes-test-token", "s3cret!"]) {
      it(`authToken ${JSON.stringify(token)} is seen by the server; params too`, async () => {
        const socket = await c.connect(srv, { transport, authToken: token, params: { user: "alice", room: "r1" } });
        if (transport === "websocket") assert.equal(socket.conn.protocol, "phoenix");
        const response = await c.join(socket.channel("test:whoami"));
        assert.equal(response.topic, "test:whoami");
        assert.equal(response.token, token);
        assert.equal(response.params.user, "alice");
        assert.equal(response.params.room, "r1");
      });
    }

    it("without authToken the token is null", async () => {
      const socket = await c.connect(srv, { transport });
      const response = await c.join(socket.channel("test:whoami"));
      assert.equal(response.token, null);
    });

    it("a refused connect (reject=true) errors the socket and never opens it", async () => {
      const socket = c.makeSocket(srv, { transport, params: { reject: "true" } });
      let opened = false;
      socket.onOpen(() => (opened = true));
      const errored = new Promise((resolve) => socket.onError((e) => resolve(e)));
      socket.connect();
      const err = await c.withTimeout(errored, 5000, "the socket's onError for a refused connect");
      assert.equal(opened, false);
      if (transport === "longpoll") assert.equal(err, 403);
      await c.disconnect(socket);
    });

    for (const serializer of [c.SERIALIZERS.V2, c.SERIALIZERS.V1]) {
      it(`${serializer.name}: the URL carries vsn=${serializer.vsn} and a join works`, async () => {
        const socket = await c.connect(srv, { transport, serializer });
        assert.match(socket.endPointURL(), new RegExp(`[?&]vsn=${serializer.vsn.replace(/\./g, "\\.")}$`));
        const topic = c.uniqueTopic("test");
        assert.equal((await c.join(socket.channel(topic))).topic, topic);
      });
    }
  });
});
