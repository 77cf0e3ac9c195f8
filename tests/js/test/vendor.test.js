"use strict";
// The vendored browser client and the demo page: byte-identical to the locked phoenix package,
// and the page has what the browser tests and people rely on.

const { describe, it } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const { REPO_ROOT } = require("../lib/server");

// phoenix's "exports" hides package.json from require.resolve; find the package from its main file.
const PKG = path.resolve(path.dirname(require.resolve("phoenix")), "..", "..");
const ASSETS = path.join(REPO_ROOT, "server", "assets");
const lock = JSON.parse(fs.readFileSync(path.join(__dirname, "..", "package-lock.json"), "utf8"));

describe("vendored phoenix client", () => {
  it("the installed phoenix is the locked 1.8.16", () => {
    assert.equal(lock.packages["node_modules/phoenix"].version, "1.8.16");
    assert.equal(JSON.parse(fs.readFileSync(path.join(PKG, "package.json"), "utf8")).version, "1.8.16");
  });

  for (const [vendored, original] of [
    ["phoenix.min.js", "priv/static/phoenix.min.js"],
    ["phoenix.LICENSE.md", "LICENSE.md"],
  ]) {
    it(`server/assets/${vendored} is byte-identical to phoenix/${original}`, () => {
      const a = fs.readFileSync(path.join(ASSETS, vendored));
      const b = fs.readFileSync(path.join(PKG, original));
      assert.ok(a.equals(b), `server/assets/${vendored} differs from the locked package: run scripts/vendor-phoenix.sh`);
    });
  }
});

describe("demo page (server/assets/index.html)", () => {
  const html = fs.readFileSync(path.join(ASSETS, "index.html"), "utf8");

  it("loads the vendored client from the same origin", () => {
    assert.match(html, /<script src="\/assets\/phoenix\.min\.js"><\/script>/);
    assert.doesNotMatch(html, /<script[^>]+src="(https?:)?\/\//, "no CDN scripts");
  });

  it("has the element ids the tests use", () => {
    for (const id of ["name", "room", "join", "body", "send", "messages", "status", "transport"]) {
      assert.match(html, new RegExp(`id="${id}"`), `#${id}`);
    }
    assert.match(html, /<ul id="messages"/);
    assert.match(html, /<span id="status"/);
    assert.match(html, /<span id="transport"/);
  });

  it("connects to /socket with long-poll fallback and never uses innerHTML", () => {
    assert.match(html, /new Phoenix\.Socket\("\/socket", \{ params: \{\}, longPollFallbackMs: 2500 \}\)/);
    assert.match(html, /"feed:" \+ name/, "chats on feed: rooms, which keep a history");
    assert.match(html, /since: last/, "every join carries the last position seen");
    assert.match(html, /"room:" \+ name/, "is online on room: rooms");
    assert.doesNotMatch(html, /innerHTML|outerHTML|insertAdjacentHTML|document\.write/);
  });
});
