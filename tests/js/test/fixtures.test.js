// The serializer fixture the Rust tests decode must be what the pinned phoenix client encodes.
const { test } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const { capture } = require("../scripts/capture-frames.js");

test("serializer fixture matches what phoenix.js encodes", () => {
  const file = path.join(__dirname, "../../../serializer/tests/fixtures/phoenix-js-frames.json");
  const committed = JSON.parse(fs.readFileSync(file, "utf8"));
  assert.deepEqual(capture(), committed, "re-run: node tests/js/scripts/capture-frames.js > " + file);
});
