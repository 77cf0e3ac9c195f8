"use strict";
// `fawkes serve` with token auth and namespaces, driven by phoenix.js: a JWT given as the connect
// param `token` or as phoenix.js's `authToken` connects on every transport, and the server
// broadcasts client pushes with the token's user; an expired token never opens a socket.
//
// The `fawkes` binary is FAWKES_BIN, or `fawkes` beside the test server binary.

const { describe, test, before, after } = require("node:test");
const assert = require("node:assert/strict");
const crypto = require("node:crypto");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");

const server = require("../lib/server");
const { connect, disconnectAll, join, joinResult, makeSocket, pushOk, waitForEvent, withTimeout } = require("../lib/client");

const SECRET = "phoenix.js test secret";

function fawkesBinary() {
  return process.env.FAWKES_BIN || path.join(path.dirname(server.binaryPath()), "fawkes");
}

/** An HS256 JWT of `claims`, signed with SECRET. */
function jwt(claims) {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const unsigned = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${unsigned}.${crypto.createHmac("sha256", SECRET).update(unsigned).digest("base64url")}`;
}

const now = () => Math.floor(Date.now() / 1000);

describe("fawkes serve with token auth, driven by phoenix.js", () => {
  let srv;
  let dir;

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "fawkes-js-auth-"));
    const config = path.join(dir, "fawkes.toml");
    fs.writeFileSync(
      config,
      [
        "[auth]",
        `jwt_secret = "${SECRET}"`,
        "[[namespace]]",
        'pattern = "chat:*"',
        'join = "authenticated"',
        "publish = true",
        "presence = true",
        "[[namespace]]",
        'pattern = "mine:*"',
        'join = "claim"',
        "",
      ].join("\n")
    );
    srv = await server.start({
      binary: fawkesBinary(),
      readyRe: /listening on http:\/\/(\S+):(\d+)/,
      args: ["serve", "--bind", "127.0.0.1:0", "--config", config, "--database", `sqlite://${path.join(dir, "db.db")}`],
      env: { NO_COLOR: "1", RUST_LOG: process.env.RUST_LOG || "info" },
    });
  });

  after(async () => {
    await disconnectAll();
    await server.stopAll();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  for (const transport of ["websocket", "longpoll", "sse"]) {
    for (const how of ["params", "authToken"]) {
      test(`${transport}, token as ${how}: joins and publishes as the token's user`, async () => {
        const user = `${transport}-${how}`;
        const token = jwt({ sub: user, exp: now() + 600, channels: [`mine:${user}`] });
        const opts = how === "params" ? { params: { token } } : { authToken: token };
        const socket = await connect(srv, { transport, ...opts });
        const topic = `chat:${user}`;
        const channel = socket.channel(topic, {});
        // Presence changes go out once per window: the user's own entry comes in the state or in
        // the diff right after it.
        const listed = new Promise((resolve) => {
          channel.on("presence_state", (state) => state[user] && resolve());
          channel.on("presence_diff", (diff) => diff.joins && diff.joins[user] && resolve());
        });
        await join(channel);
        await withTimeout(listed, 5000, `${user} in the presence list`);
        const shout = waitForEvent(channel, "shout");
        assert.deepEqual(await pushOk(channel, "shout", { text: "hi", user: "someone else" }), {});
        assert.deepEqual(await shout, { text: "hi", user });
        // The channels claim: this user's own topic, not another's.
        await join(socket.channel(`mine:${user}`, {}));
        const other = await joinResult(socket.channel("mine:someone-else", {}));
        assert.deepEqual(other, { status: "error", response: { reason: "unauthorized" } });
        const unmatched = await joinResult(socket.channel("room:lobby", {}));
        assert.deepEqual(unmatched, { status: "error", response: { reason: "unmatched topic" } });
      });
    }

    test(`${transport}: an expired token never opens the socket`, async () => {
      const token = jwt({ sub: "late", exp: now() - 3600 });
      const socket = makeSocket(srv, { transport, params: { token }, reconnectAfterMs: () => 60000 });
      let opened = false;
      socket.onOpen(() => (opened = true));
      const refused = new Promise((resolve) => socket.onError(resolve));
      socket.connect();
      await refused;
      assert.equal(opened, false);
      socket.disconnect();
    });
  }
});
