"use strict";
// The demo page in headless Chromium: with WebSocket blocked it falls back to long-poll and chats
// with a phoenix.js client in the same room; a page that lost its connection shows what it missed
// once back, and says "history reset" when the server could not recover it.
const { test, after } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const server = require("../lib/server");
const c = require("../lib/client");
const { cuttingProxy } = require("../lib/proxy");

const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const ARTIFACTS = path.resolve(__dirname, "..", ".artifacts");

after(async () => {
  await c.disconnectAll();
  await server.stopAll();
});

const haveChromium = fs.existsSync(CHROMIUM);
if (!haveChromium) {
  const msg = `Chromium not found at ${CHROMIUM} (scripts/test installs Debian's chromium)`;
  if (process.env.CI === "true") throw new Error(msg);
  process.stderr.write(`\n*** SKIP browser test: ${msg} ***\n\n`);
}

function launch() {
  const { chromium } = require("playwright-core");
  return chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
}

/** The bodies of the chat lines the page shows, in order. */
function shownBodies(page) {
  return page.locator("#messages li.msg .body").allTextContents();
}

/** A phoenix.js user in the page's room: on `feed:` to chat, on `room:` to be online. */
async function joinAs(srv, room, user, opts = {}) {
  const socket = await c.connect(srv, opts);
  const feed = socket.channel(`feed:${room}`, { user });
  await c.join(feed);
  await c.join(socket.channel(`room:${room}`, { user }));
  return { socket, feed };
}

test("the demo page falls back to long-poll and chats", { skip: !haveChromium }, async () => {
  const srv = await server.start({ args: ["--no-websocket"] });
  const browser = await launch();
  try {
    const page = await browser.newPage();
    const pageErrors = [];
    page.on("pageerror", (err) => pageErrors.push(err.message));
    const room = c.uniqueTopic("lobby").replace(/:/g, "-");
    await page.goto(`${srv.httpUrl}/?user=alice&room=${encodeURIComponent(room)}`);

    await page.waitForFunction(() => document.querySelector("#transport")?.textContent.trim() === "longpoll", null, {
      timeout: 15000,
    });

    // A phoenix.js client on long-poll joins the same room and talks to the page.
    const { feed: channel } = await joinAs(srv, room, "bob", { transport: "longpoll" });
    await page.waitForFunction(() => document.querySelector("#status")?.textContent.toLowerCase().includes("joined"),
      null, { timeout: 15000 });

    // Presence: the page lists both users.
    await page.waitForFunction(() => document.querySelector("#online")?.textContent === "online: alice, bob", null, {
      timeout: 10000,
    });

    const bobHears = c.waitForEvent(channel, "new_msg", { predicate: (p) => p.user === "alice", timeout: 10000 });
    await page.fill("#body", "hi from the browser");
    await page.click("#send");
    const heard = await bobHears;
    assert.equal(typeof heard.pos, "string", "feed messages carry their position");
    assert.deepEqual({ ...heard, pos: undefined }, { body: "hi from the browser", user: "alice", pos: undefined });

    await c.pushOk(channel, "new_msg", { body: "<b>hello</b> alice" });
    const bobLine = page.locator("#messages li.msg", { hasText: "hello" });
    await bobLine.waitFor({ timeout: 10000 });
    assert.equal(await bobLine.locator(".user").textContent(), "bob");
    assert.equal(await bobLine.locator(".body").textContent(), "<b>hello</b> alice", "shown as text, not HTML");
    const own = page.locator("#messages li.msg", { hasText: "hi from the browser" });
    assert.equal(await own.locator(".user").textContent(), "alice");

    fs.mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: path.join(ARTIFACTS, "demo-page-longpoll.png") });
    assert.deepEqual(pageErrors, []);
  } finally {
    await browser.close();
  }
});

test("a page that lost its connection shows the messages it missed, once back", { skip: !haveChromium }, async () => {
  const srv = await server.start();
  const proxy = await cuttingProxy({ host: "127.0.0.1", port: srv.port });
  const browser = await launch();
  try {
    const page = await browser.newPage();
    const pageErrors = [];
    page.on("pageerror", (err) => pageErrors.push(err.message));
    const room = c.uniqueTopic("lobby").replace(/:/g, "-");
    await page.goto(`${proxy.httpUrl}/?user=alice&room=${encodeURIComponent(room)}`);
    await page.waitForFunction(() => document.querySelector("#status")?.textContent.startsWith("joined"), null, {
      timeout: 15000,
    });
    const { feed } = await joinAs(srv, room, "bob");
    await c.pushOk(feed, "new_msg", { body: "before" });
    await page.locator("#messages li.msg", { hasText: "before" }).waitFor({ timeout: 10000 });

    // The page's connection dies and it cannot get a new one; bob talks meanwhile.
    proxy.state.blocked = true;
    proxy.cut();
    await page.waitForFunction(() => document.querySelector("#status")?.textContent.startsWith("joined") === false,
      null, { timeout: 10000 });
    for (const body of ["missed 1", "missed 2", "missed 3"]) await c.pushOk(feed, "new_msg", { body });
    proxy.state.blocked = false;

    await page.locator("#messages li.msg", { hasText: "missed 3" }).waitFor({ timeout: 20000 });
    await c.pushOk(feed, "new_msg", { body: "after" });
    await page.locator("#messages li.msg", { hasText: "after" }).waitFor({ timeout: 10000 });
    assert.deepEqual(await shownBodies(page), ["before", "missed 1", "missed 2", "missed 3", "after"],
      "every missed message once, in order");
    assert.equal(await page.locator("#messages li.reset").count(), 0, "no history reset");
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: path.join(ARTIFACTS, "demo-page-recovered.png") });
    assert.deepEqual(pageErrors, []);
  } finally {
    await browser.close();
    await proxy.close();
  }
});

test("a page that reconnects to a restarted server says history reset", { skip: !haveChromium }, async () => {
  const first = await server.start();
  const proxy = await cuttingProxy({ host: "127.0.0.1", port: first.port });
  const browser = await launch();
  try {
    const page = await browser.newPage();
    const room = c.uniqueTopic("lobby").replace(/:/g, "-");
    await page.goto(`${proxy.httpUrl}/?user=alice&room=${encodeURIComponent(room)}`);
    await page.waitForFunction(() => document.querySelector("#status")?.textContent.startsWith("joined"), null, {
      timeout: 15000,
    });
    const bob = await joinAs(first, room, "bob");
    await c.pushOk(bob.feed, "new_msg", { body: "before the restart" });
    await page.locator("#messages li.msg", { hasText: "before the restart" }).waitFor({ timeout: 10000 });
    await c.disconnect(bob.socket);

    // A new server on the same port: a new in-memory history, whose epoch the page's position is not of.
    await first.kill();
    const second = await first.restart();
    const reset = page.locator("#messages li.reset");
    await reset.waitFor({ timeout: 20000 });
    assert.match(await reset.textContent(), /history reset/);
    await page.waitForFunction(() => document.querySelector("#status")?.textContent.startsWith("joined"), null, {
      timeout: 15000,
    });
    const again = await joinAs(second, room, "bob");
    await c.pushOk(again.feed, "new_msg", { body: "after the restart" });
    await page.locator("#messages li.msg", { hasText: "after the restart" }).waitFor({ timeout: 10000 });
    assert.deepEqual(await shownBodies(page), ["before the restart", "after the restart"]);
  } finally {
    await browser.close();
    await proxy.close();
  }
});
