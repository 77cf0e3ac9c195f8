// Encodes a set of client messages with phoenix.js's own Serializer and prints them as JSON:
// text frames as strings, binary frames as arrays of bytes. The Rust serializer tests decode these
// (serializer/tests/fixtures/phoenix-js-frames.json); test/fixtures.test.js checks the file still
// matches what the pinned phoenix package produces.
const { Serializer } = require("phoenix");

const messages = [
  { join_ref: "1", ref: "1", topic: "room:lobby", event: "phx_join", payload: { user: "ann" } },
  { join_ref: null, ref: "2", topic: "phoenix", event: "heartbeat", payload: {} },
  { join_ref: "1", ref: "3", topic: "room:lobby", event: "new_msg", payload: { body: "héllo \"quoted\" \u2603" } },
  { join_ref: "1", ref: "4", topic: "room:lobby", event: "phx_leave", payload: {} },
  { join_ref: "5", ref: "6", topic: "room:bin", event: "ping", payload: new Uint8Array([0, 1, 2, 250, 255, 10, 13]).buffer },
];

function capture() {
  return messages.map((msg) => {
    let frame;
    Serializer.encode(msg, (encoded) => { frame = encoded; });
    const expected = { ...msg };
    if (msg.payload instanceof ArrayBuffer) expected.payload = { binary: Array.from(new Uint8Array(msg.payload)) };
    return {
      message: expected,
      frame: typeof frame === "string" ? { text: frame } : { binary: Array.from(new Uint8Array(frame)) },
    };
  });
}

module.exports = { capture };
if (require.main === module) process.stdout.write(JSON.stringify(capture(), null, 1) + "\n");
