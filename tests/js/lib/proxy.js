"use strict";
// A TCP proxy for tests that lose connections: it cuts them all at once, cuts one in the middle of
// an answer, or refuses new ones for a while.

const net = require("node:net");

/**
 * A TCP proxy to `target` that can cut every connection through it at once, cut one connection
 * in the middle of an answer carrying broadcasts (half of it reaches the client, then the
 * connection dies), and refuse new connections for a while.
 */
async function cuttingProxy(target) {
  const pairs = new Set();
  // onMidAnswerCut: called when an armed cut happens.
  const state = { armed: false, midAnswerCuts: 0, blocked: false, onMidAnswerCut: null };
  const proxy = net.createServer((client) => {
    if (state.blocked) {
      client.destroy();
      return;
    }
    const upstream = net.connect(target.port, target.host);
    const pair = { client, upstream };
    pairs.add(pair);
    const drop = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("error", drop).on("close", drop);
    upstream.on("error", drop).on("close", drop);
    client.pipe(upstream);
    upstream.on("data", (chunk) => {
      // The server wrote an answer with broadcasts in it (a long-poll response, SSE events, a
      // WebSocket frame) and counts it as sent; the client gets half of it and a dead connection.
      if (state.armed && chunk.includes("new_msg")) {
        state.armed = false;
        state.midAnswerCuts += 1;
        client.write(chunk.subarray(0, chunk.length >> 1), () => drop());
        upstream.pause();
        if (state.onMidAnswerCut) state.onMidAnswerCut();
        return;
      }
      if (!client.write(chunk)) {
        upstream.pause();
        client.once("drain", () => upstream.resume());
      }
    });
  });
  await new Promise((resolve) => proxy.listen(0, "127.0.0.1", resolve));
  const { port } = proxy.address();
  return {
    url: `ws://127.0.0.1:${port}/socket`,
    httpUrl: `http://127.0.0.1:${port}`,
    state,
    /** Destroys every open connection; returns how many. */
    cut() {
      const n = pairs.size;
      for (const { client, upstream } of [...pairs]) {
        client.destroy();
        upstream.destroy();
      }
      pairs.clear();
      return n;
    },
    /** The next chunk of an answer carrying `new_msg`, on any connection, is cut in half. */
    cutMidAnswer() {
      state.armed = true;
    },
    close: () =>
      new Promise((resolve) => {
        for (const { client, upstream } of pairs) {
          client.destroy();
          upstream.destroy();
        }
        proxy.close(() => resolve());
      }),
  };
}

module.exports = { cuttingProxy };
