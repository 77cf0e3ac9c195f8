"use strict";
// Cross-origin pages in headless Chromium against `fawkes serve --allowed-origin`: a page served
// from another origin (a static server of its own on another port) that loads phoenix.js from
// the fawkes server and connects to it. From an allowed origin it joins and chats with a
// phoenix.js client; from a refused origin it never joins; behind a proxy that refuses WebSocket
// upgrades it falls back to long-poll (cross-origin, with CORS) and chats.
const { test, before, after } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const http = require("node:http");
const os = require("node:os");
const path = require("node:path");
const server = require("../lib/server");
const c = require("../lib/client");

const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const FAWKES_READY_RE = /listening on http:\/\/(\S+):(\d+)/;
const haveChromium = fs.existsSync(CHROMIUM);
if (!haveChromium) {
  const msg = `Chromium not found at ${CHROMIUM} (scripts/test installs Debian's chromium)`;
  if (process.env.CI === "true") throw new Error(msg);
  process.stderr.write(`\n*** SKIP cross-origin browser tests: ${msg} ***\n\n`);
}

// The page: phoenix.js from the fawkes server, a socket to `?socket=`, room `?room=`; what
// happens is kept in window.result for the test to read.
const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>front end</title>
<script src="FAWKES/assets/phoenix.min.js"></script>
<script>
  const q = new URLSearchParams(location.search);
  window.result = { joined: false, transport: null, refused: null, socketErrors: 0, messages: [] };
  const socket = new Phoenix.Socket(q.get("socket"), { longPollFallbackMs: 1000, reconnectAfterMs: () => 300 });
  socket.onError(() => { window.result.socketErrors += 1; });
  socket.connect();
  const channel = socket.channel("room:" + q.get("room"), {});
  channel.on("new_msg", (p) => window.result.messages.push(p));
  channel.join()
    .receive("ok", () => {
      window.result.joined = true;
      window.result.transport = socket.transport === Phoenix.LongPoll ? "longpoll" : "websocket";
    })
    .receive("error", (e) => { window.result.refused = e; });
  window.say = (body) => channel.push("new_msg", { body });
</script>
<p>front end</p>`;

let fawkes;
let front; // the static server: the page's origin
let noUpgrade; // a proxy to fawkes that refuses WebSocket upgrades
let browser;

function listen(srv) {
  return new Promise((resolve) => srv.listen(0, "127.0.0.1", () => resolve(srv.address().port)));
}

before(async () => {
  if (!haveChromium) return;
  front = http.createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
    res.end(PAGE.replace("FAWKES", fawkes.httpUrl));
  });
  front.port = await listen(front);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "fawkes-origin-"));
  fawkes = await server.start({
    binary: process.env.FAWKES_BIN || path.join(path.dirname(server.binaryPath()), "fawkes"),
    readyRe: FAWKES_READY_RE,
    args: [
      "serve",
      "--bind",
      "127.0.0.1:0",
      "--database",
      `sqlite://${path.join(dir, "fawkes.db")}`,
      // The page's origin is http://localhost:PORT; http://127.0.0.1:PORT is another origin.
      "--allowed-origin",
      `http://localhost:${front.port}`,
    ],
    env: { NO_COLOR: "1" },
  });
  // A proxy without WebSocket support: plain HTTP goes through, an upgrade is answered 502.
  noUpgrade = http.createServer((req, res) => {
    const up = http.request(
      { host: fawkes.host, port: fawkes.port, method: req.method, path: req.url, headers: req.headers },
      (answer) => {
        res.writeHead(answer.statusCode, answer.headers);
        answer.pipe(res);
      }
    );
    up.once("error", (err) => {
      res.writeHead(502);
      res.end(err.message);
    });
    req.pipe(up);
  });
  noUpgrade.on("upgrade", (req, sock) => {
    sock.end("HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
  });
  noUpgrade.port = await listen(noUpgrade);
  const { chromium } = require("playwright-core");
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  if (browser) await browser.close();
  await c.disconnectAll();
  await server.stopAll();
  for (const s of [front, noUpgrade]) {
    if (s) {
      s.closeAllConnections();
      await new Promise((resolve) => s.close(resolve));
    }
  }
});

/** Opens the page from `origin`, connecting to `socketUrl`, in room `room`. */
async function open(origin, socketUrl, room) {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (err) => errors.push(err.message));
  const q = new URLSearchParams({ socket: socketUrl, room });
  await page.goto(`${origin}/?${q}`);
  page.errors = errors;
  return page;
}

/** The page and a phoenix.js client in the same room say hello to each other. */
async function chats(page, room) {
  const bob = await c.connect(fawkes, { transport: "websocket" });
  const channel = bob.channel(`room:${room}`, {});
  await c.join(channel);
  const bobHears = c.waitForEvent(channel, "new_msg", { predicate: (p) => p.body === "hi from the page", timeout: 10000 });
  await page.evaluate(() => window.say("hi from the page"));
  assert.equal((await bobHears).body, "hi from the page");
  await c.pushOk(channel, "new_msg", { body: "hi from bob" });
  await page.waitForFunction(() => window.result.messages.some((m) => m.body === "hi from bob"), null, {
    timeout: 10000,
  });
}

test("a page from an allowed origin connects over WebSocket and chats", { skip: !haveChromium }, async () => {
  const room = c.uniqueTopic("origin").replace(/:/g, "-");
  const page = await open(`http://localhost:${front.port}`, `ws://127.0.0.1:${fawkes.port}/socket`, room);
  await page.waitForFunction(() => window.result.joined, null, { timeout: 15000 });
  assert.equal(await page.evaluate(() => window.result.transport), "websocket");
  await chats(page, room);
  assert.deepEqual(page.errors, []);
  await page.close();
});

test("a page from a refused origin never joins", { skip: !haveChromium }, async () => {
  const room = c.uniqueTopic("origin").replace(/:/g, "-");
  // Same page, same server, another origin: http://127.0.0.1:PORT is not in the list.
  const page = await open(`http://127.0.0.1:${front.port}`, `ws://127.0.0.1:${fawkes.port}/socket`, room);
  // Refused over WebSocket, then over the long-poll fallback, and again on every retry.
  await page.waitForFunction(() => window.result.socketErrors >= 3, null, { timeout: 15000 });
  const result = await page.evaluate(() => window.result);
  assert.equal(result.joined, false, JSON.stringify(result));
  // The server answers such a connection 403 (what the browser's console showed as the refusal).
  const refused = await fetch(`${fawkes.httpUrl}/socket/longpoll?vsn=2.0.0`, {
    headers: { origin: `http://127.0.0.1:${front.port}` },
  }).then((r) => r.json());
  assert.equal(refused.status, 403);
  await page.close();
});

test("a page whose WebSocket is refused falls back to long-poll and chats", { skip: !haveChromium }, async () => {
  const room = c.uniqueTopic("origin").replace(/:/g, "-");
  const page = await open(`http://localhost:${front.port}`, `ws://127.0.0.1:${noUpgrade.port}/socket`, room);
  await page.waitForFunction(() => window.result.joined, null, { timeout: 15000 });
  assert.equal(await page.evaluate(() => window.result.transport), "longpoll");
  await chats(page, room);
  assert.deepEqual(page.errors, []);
  await page.close();
});
