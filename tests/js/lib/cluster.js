"use strict";
// Several `fawkes serve` nodes sharing a PubSub backend (Redis or PostgreSQL), a round-robin HTTP
// proxy that sends every request of a client to the next node, and phoenix.js Presence lists.
//
// The `fawkes` binary is FAWKES_BIN, or `fawkes` beside the test server binary. The backends are
// the machine's: FAWKES_TEST_REDIS (default redis://127.0.0.1:6379) and FAWKES_TEST_POSTGRES
// (default postgres://postgres@127.0.0.1:5432/test). A test whose backend is unreachable fails
// under CI=true and is skipped with a loud SKIP line otherwise.

const fs = require("node:fs");
const http = require("node:http");
const net = require("node:net");
const os = require("node:os");
const path = require("node:path");
const { spawn } = require("node:child_process");
const { Presence } = require("phoenix");

const server = require("./server");

const REDIS_URL = process.env.FAWKES_TEST_REDIS || "redis://127.0.0.1:6379";
const POSTGRES_URL = process.env.FAWKES_TEST_POSTGRES || "postgres://postgres@127.0.0.1:5432/test";
const FAWKES_READY_RE = /listening on http:\/\/(\S+):(\d+)/;

function fawkesBinary() {
  return process.env.FAWKES_BIN || path.join(path.dirname(server.binaryPath()), "fawkes");
}

/** Whether something accepts TCP connections at `url`'s host and port. */
function reachable(url) {
  const u = new URL(url);
  return new Promise((resolve) => {
    const sock = net.connect({ host: u.hostname, port: Number(u.port) }, () => {
      sock.destroy();
      resolve(true);
    });
    sock.once("error", () => resolve(false));
    sock.setTimeout(2000, () => {
      sock.destroy();
      resolve(false);
    });
  });
}

/** True when `url` is reachable; otherwise throws under CI=true, or prints a loud SKIP. */
async function requireBackend(t, name, url) {
  if (await reachable(url)) return true;
  const msg = `${name} unreachable at ${url}`;
  if (process.env.CI === "true") throw new Error(`${msg} (CI=true: the multi-node tests need it)`);
  process.stderr.write(`\n*** SKIP: ${msg}; the multi-node ${name} tests did not run ***\n\n`);
  t.skip(msg);
  return false;
}

/** A free TCP port on 127.0.0.1. */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/**
 * Starts one `fawkes serve` node. opts: {pubsub, cluster, secret, presenceTimeout (s), bind}.
 * Each node gets its own SQLite file.
 */
async function startNode(opts) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "fawkes-node-"));
  const args = ["serve", "--bind", opts.bind || "127.0.0.1:0", "--database", `sqlite://${path.join(dir, "node.db")}`];
  // Without a backend, a node alone.
  if (opts.pubsub) {
    args.push("--pubsub", opts.pubsub, "--cluster", opts.cluster, "--secret", opts.secret || "cluster test secret");
    args.push("--presence-timeout", String(opts.presenceTimeout || 3));
  }
  const node = await server.start({
    binary: fawkesBinary(),
    readyRe: FAWKES_READY_RE,
    args,
    env: { NO_COLOR: "1", RUST_LOG: process.env.RUST_LOG || "info" },
  });
  node.dir = dir;
  return node;
}

/**
 * An HTTP proxy that sends each request to the next of `nodes` in turn, so consecutive requests
 * of one long-poll client land on different nodes. `hits[i]` counts requests sent to node i.
 */
async function roundRobinProxy(nodes) {
  let next = 0;
  const hits = nodes.map(() => 0);
  const proxy = http.createServer((req, res) => {
    const i = next++ % nodes.length;
    hits[i] += 1;
    const target = nodes[i];
    const upstream = http.request(
      { host: target.host, port: target.port, method: req.method, path: req.url, headers: req.headers },
      (up) => {
        res.writeHead(up.statusCode, up.headers);
        up.pipe(res);
      }
    );
    upstream.once("error", (err) => {
      res.writeHead(502, { "content-type": "text/plain" });
      res.end(`proxy: ${err.message}`);
    });
    req.pipe(upstream);
  });
  await new Promise((resolve) => proxy.listen(0, "127.0.0.1", resolve));
  const { port } = proxy.address();
  return {
    hits,
    url: `ws://127.0.0.1:${port}/socket`,
    close: () =>
      new Promise((resolve) => {
        proxy.closeAllConnections();
        proxy.close(() => resolve());
      }),
  };
}

/** A phoenix.js Presence on `channel` whose sorted key list can be awaited. */
function trackPresence(channel) {
  const presence = new Presence(channel);
  const waiters = new Set();
  const keys = () => presence.list((key) => key).sort();
  presence.onSync(() => {
    for (const w of [...waiters]) w();
  });
  return {
    presence,
    keys,
    /** Resolves once the list is exactly `expected` (sorted keys); rejects after `timeout` ms. */
    waitFor(expected, timeout = 10000, what = "presence list") {
      const want = [...expected].sort().join(",");
      return new Promise((resolve, reject) => {
        const check = () => {
          if (keys().join(",") === want) {
            waiters.delete(check);
            clearTimeout(timer);
            resolve();
          }
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`${what}: expected [${want}], have [${keys().join(",")}] after ${timeout} ms`));
        }, timeout);
        waiters.add(check);
        check();
      });
    },
  };
}

/** A private redis-server on `port` that keeps nothing on disk; resolves once it accepts connections. */
async function startRedis(port) {
  const child = spawn(
    process.env.FAWKES_REDIS_SERVER || "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    { stdio: "ignore" }
  );
  const exited = new Promise((resolve) => child.once("exit", resolve));
  const failed = new Promise((_, reject) => child.once("error", (e) => reject(new Error(`redis-server: ${e.message}`))));
  const deadline = Date.now() + 10000;
  for (;;) {
    if (await Promise.race([reachable(`redis://127.0.0.1:${port}`), failed])) break;
    if (Date.now() > deadline) throw new Error(`redis-server on port ${port} did not start`);
    // Polling a port that has no event to await: the only way to know a server listens.
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    child,
    kill: async () => {
      child.kill("SIGKILL");
      await exited;
    },
  };
}

/** Runs SQL through psql against `url`. */
function psql(url, sql) {
  return new Promise((resolve, reject) => {
    const child = spawn("psql", [url, "-v", "ON_ERROR_STOP=1", "-Atc", sql], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.on("data", (d) => (out += d));
    child.stderr.on("data", (d) => (err += d));
    child.once("error", reject);
    child.once("exit", (code) => (code === 0 ? resolve(out.trim()) : reject(new Error(`psql: ${err.trim()}`))));
  });
}

module.exports = {
  REDIS_URL,
  POSTGRES_URL,
  freePort,
  psql,
  reachable,
  requireBackend,
  roundRobinProxy,
  startNode,
  startRedis,
  trackPresence,
};
