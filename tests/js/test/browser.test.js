"use strict";
// The demo page in headless Chromium, with WebSocket blocked: it falls back to long-poll and
// chats with a phoenix.js client in the same room.
const { test, after } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const server = require("../lib/server");
const c = require("../lib/client");

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

test("the demo page falls back to long-poll and chats", { skip: !haveChromium }, async () => {
  const { chromium } = require("playwright-core");
  const srv = await server.start({ args: ["--no-websocket"] });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
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
    const bob = await c.connect(srv, { transport: "longpoll" });
    const channel = bob.channel(`room:${room}`, { user: "bob" });
    await c.join(channel);
    await page.waitForFunction(() => document.querySelector("#status")?.textContent.toLowerCase().includes("joined"),
      null, { timeout: 15000 });

    // Presence: the page lists both users.
    await page.waitForFunction(() => document.querySelector("#online")?.textContent === "online: alice, bob", null, {
      timeout: 10000,
    });

    const bobHears = c.waitForEvent(channel, "new_msg", { predicate: (p) => p.user === "alice", timeout: 10000 });
    await page.fill("#body", "hi from the browser");
    await page.click("#send");
    assert.deepEqual(await bobHears, { body: "hi from the browser", user: "alice" });

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
