"use strict";
// Helpers around the official phoenix client (and raw `ws` sockets for wire-level checks).
//
// Transports: FAWKES_TRANSPORTS (comma-separated, default "websocket"; "longpoll" and "sse" are
// the others) selects which transports the per-transport scenario files run under. Serializers: V2
// (`vsn=2.0.0`, phoenix's default) and V1 (`vsn=1.0.0` plus an object-form encode/decode pair,
// since phoenix 1.8 only ships the V2 serializer).
//
// Nothing here waits by sleeping: every helper awaits an event or a callback, with a timeout
// that fails the test with a message naming what was awaited.

const { describe } = require("node:test");
const { Socket, LongPoll } = require("phoenix");
const WebSocket = require("ws");

const DEFAULT_TIMEOUT_MS = Number(process.env.FAWKES_TEST_TIMEOUT_MS || 5000);

// ---------------------------------------------------------------------------------------------
// Transports and serializers

const KNOWN_TRANSPORTS = ["websocket", "longpoll", "sse"];

function transports() {
  const list = (process.env.FAWKES_TRANSPORTS || "websocket")
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean);
  for (const t of list) {
    if (!KNOWN_TRANSPORTS.includes(t)) {
      throw new Error(`FAWKES_TRANSPORTS: unknown transport "${t}" (known: ${KNOWN_TRANSPORTS.join(", ")})`);
    }
  }
  return list;
}

/** V1 JSON: the object form {topic, event, payload, ref, join_ref}. */
const v1 = {
  encode(msg, callback) {
    if (msg.payload instanceof ArrayBuffer) throw new Error("the V1 serializer has no binary form");
    const { topic, event, payload, ref, join_ref } = msg;
    return callback(JSON.stringify({ topic, event, payload, ref, join_ref }));
  },
  decode(raw, callback) {
    if (typeof raw !== "string") throw new Error("V1 socket received a binary frame");
    const { topic, event, payload, ref, join_ref } = JSON.parse(raw);
    return callback({ topic, event, payload, ref, join_ref });
  },
};

const SERIALIZERS = {
  V2: { name: "V2", vsn: "2.0.0" },
  V1: { name: "V1", vsn: "1.0.0", encode: v1.encode, decode: v1.decode },
};

// phoenix ignores custom encode/decode when `transport === LongPoll`; a subclass is a distinct
// class, so it lets the V1 pair through while behaving exactly like LongPoll.
class LongPollV1 extends LongPoll {}

function transportClass(transport, serializer) {
  switch (transport) {
    case "websocket":
      return WebSocket;
    case "longpoll":
      return serializer.name === "V1" ? LongPollV1 : LongPoll;
    case "sse":
      return sseTransport();
    default:
      throw new Error(`unknown transport ${transport}`);
  }
}

/** clients/js/sse-transport.js, with the `eventsource` package as its EventSource (Node 20 has none). */
function sseTransport() {
  const SSETransport = require("../../../clients/js/sse-transport.js");
  if (!SSETransport.EventSource && typeof EventSource === "undefined") {
    SSETransport.EventSource = require("eventsource").EventSource;
  }
  return SSETransport;
}

/** Runs `fn(transport)` inside a describe block once per transport in FAWKES_TRANSPORTS. */
function forEachTransport(fn) {
  for (const transport of transports()) {
    describe(`[${transport}]`, () => fn(transport));
  }
}

/** Runs `fn(serializer)` inside a describe block for V2 and V1. */
function forEachSerializer(fn) {
  for (const serializer of [SERIALIZERS.V2, SERIALIZERS.V1]) {
    describe(`[${serializer.name}]`, () => fn(serializer));
  }
}

// ---------------------------------------------------------------------------------------------
// Timeouts

function withTimeout(promise, ms, what, cleanup) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => {
      cleanup && cleanup();
      reject(new Error(`timed out after ${ms} ms waiting for ${what}`));
    }, ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------------------------
// phoenix Socket helpers

const openSockets = new Set();
const rawSockets = new Set();

/**
 * Makes a phoenix Socket (not yet connected).
 * opts: {transport = "websocket", serializer = SERIALIZERS.V2, params, authToken, ...any Socket option}
 */
function makeSocket(server, opts = {}) {
  const { transport = "websocket", serializer = SERIALIZERS.V2, ...rest } = opts;
  const url = typeof server === "string" ? server : server.url;
  const socketOpts = {
    transport: transportClass(transport, serializer),
    vsn: serializer.vsn,
    timeout: 10000,
    ...rest,
  };
  if (serializer.encode) {
    socketOpts.encode = serializer.encode;
    socketOpts.decode = serializer.decode;
  }
  const socket = new Socket(url, socketOpts);
  socket.fawkesTransport = transport;
  socket.fawkesSerializer = serializer.name;
  openSockets.add(socket);
  return socket;
}

/** Resolves when the socket's next open event fires. */
function waitForOpen(socket, { timeout = DEFAULT_TIMEOUT_MS } = {}) {
  let refs = [];
  const p = new Promise((resolve, reject) => {
    refs.push(socket.onOpen(() => resolve()));
    refs.push(
      socket.onError((err) =>
        reject(new Error(`socket error before open: ${describeError(err)}`))
      )
    );
  });
  return withTimeout(p, timeout, `the socket to open (${socket.endPointURL()})`).finally(() => socket.off(refs));
}

/** makeSocket + connect, resolved once open. */
async function connect(server, opts = {}) {
  const socket = makeSocket(server, opts);
  const opened = waitForOpen(socket);
  socket.connect();
  await opened;
  return socket;
}

/** Disconnects and resolves once the transport is closed. */
function disconnect(socket) {
  openSockets.delete(socket);
  return withTimeout(
    new Promise((resolve) => socket.disconnect(() => resolve())),
    5000,
    "socket.disconnect() to finish"
  );
}

/** Disconnects every socket made by makeSocket and closes every RawSocket (use in afterEach/after). */
async function disconnectAll() {
  await Promise.all([
    ...[...openSockets].map((s) => disconnect(s).catch(() => {})),
    ...[...rawSockets].map((r) => r.close()),
  ]);
}

function describeError(err) {
  if (err == null) return String(err);
  if (typeof err === "number") return `status ${err}`;
  if (err.message) return err.message;
  if (err.error && err.error.message) return err.error.message;
  return String(err.type || err);
}

/**
 * Resolves {status, response} of a Push (a join or a channel push) for whichever of
 * ok/error/timeout comes first.
 */
function pushResult(pushObj, what, timeout = DEFAULT_TIMEOUT_MS + 1000) {
  const p = new Promise((resolve) => {
    pushObj
      .receive("ok", (response) => resolve({ status: "ok", response }))
      .receive("error", (response) => resolve({ status: "error", response }))
      .receive("timeout", () => resolve({ status: "timeout", response: undefined }));
  });
  return withTimeout(p, timeout, what);
}

/** Joins; resolves {status, response} whatever the status. */
function joinResult(channel, { timeout = DEFAULT_TIMEOUT_MS } = {}) {
  return pushResult(channel.join(timeout), `the join reply of ${channel.topic}`, timeout + 1000);
}

/** Joins; resolves the ok response, rejects with a clear message otherwise. */
async function join(channel, opts) {
  const { status, response } = await joinResult(channel, opts);
  if (status !== "ok") {
    throw new Error(`join of ${channel.topic} answered ${status}: ${JSON.stringify(response)}`);
  }
  return response;
}

/** Pushes; resolves {status, response} (status "ok", "error" or "timeout"). */
function push(channel, event, payload = {}, { timeout = DEFAULT_TIMEOUT_MS } = {}) {
  return pushResult(channel.push(event, payload, timeout), `the reply to "${event}" on ${channel.topic}`, timeout + 1000);
}

/** Pushes; resolves the ok response, rejects otherwise. */
async function pushOk(channel, event, payload, opts) {
  const { status, response } = await push(channel, event, payload, opts);
  if (status !== "ok") {
    throw new Error(`push "${event}" on ${channel.topic} answered ${status}: ${safeJson(response)}`);
  }
  return response;
}

/**
 * Resolves the payload of the next `event` on the channel (optionally the next one for which
 * `predicate(payload)` holds).
 */
function waitForEvent(channel, event, { timeout = DEFAULT_TIMEOUT_MS, predicate } = {}) {
  let ref;
  const p = new Promise((resolve) => {
    ref = channel.on(event, (payload, msgRef, joinRef) => {
      if (predicate && !predicate(payload)) return;
      channel.off(event, ref);
      resolve(payload);
    });
  });
  return withTimeout(p, timeout, `event "${event}" on ${channel.topic}`, () => channel.off(event, ref));
}

/** Records every event of the given names on a channel: returns an array filled as they come. */
function record(channel, events) {
  const seen = [];
  for (const event of events) channel.on(event, (payload) => seen.push({ event, payload }));
  return seen;
}

/** Records every decoded message the socket receives ({topic, event, payload, ref, join_ref}). */
function recordMessages(socket) {
  const seen = [];
  socket.onMessage((msg) => seen.push(msg));
  return seen;
}

/**
 * Resolves once the socket receives a message for which predicate(msg) holds (msg is the
 * decoded {topic, event, payload, ref, join_ref}).
 */
function waitForMessage(socket, predicate, what, { timeout = DEFAULT_TIMEOUT_MS } = {}) {
  let ref;
  const p = new Promise((resolve) => {
    ref = socket.onMessage((msg) => {
      if (predicate(msg)) resolve(msg);
    });
  });
  return withTimeout(p, timeout, what).finally(() => socket.off([ref]));
}

/** Counts successful joins (first join and every rejoin) of a channel; call before join(). */
function countJoins(channel) {
  const counter = { ok: 0, waiters: [] };
  channel.joinPush.receive("ok", () => {
    counter.ok += 1;
    counter.waiters = counter.waiters.filter(([n, resolve]) => {
      if (counter.ok >= n) {
        resolve();
        return false;
      }
      return true;
    });
  });
  counter.until = (n, { timeout = DEFAULT_TIMEOUT_MS } = {}) =>
    withTimeout(
      counter.ok >= n ? Promise.resolve() : new Promise((resolve) => counter.waiters.push([n, resolve])),
      timeout,
      `${channel.topic} to have joined ${n} time(s) (joined ${counter.ok} so far)`
    );
  return counter;
}

/** Stops the client from rejoining a channel whose join was refused, and drops it. */
function abandon(channel) {
  channel.leave();
}

function safeJson(v) {
  if (v instanceof ArrayBuffer) return `ArrayBuffer[${[...new Uint8Array(v)].join(",")}]`;
  try {
    return JSON.stringify(v);
  } catch {
    return String(v);
  }
}

function bytes(buf) {
  if (buf instanceof ArrayBuffer) return [...new Uint8Array(buf)];
  if (ArrayBuffer.isView(buf)) return [...new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength)];
  throw new Error(`expected binary data, got ${safeJson(buf)}`);
}

function arrayBuffer(byteList) {
  return new Uint8Array(byteList).buffer;
}

let topicSeq = 0;
/** A topic name unique within this process run, e.g. uniqueTopic("room") -> "room:t123-4". */
function uniqueTopic(prefix) {
  topicSeq += 1;
  return `${prefix}:t${process.pid}-${topicSeq}`;
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket client, for wire-level checks

/**
 * A raw ws connection to `server` with the given query (default vsn=2.0.0). Every received
 * frame is kept in `frames` (text frames JSON-decoded when possible, binary frames as Buffer).
 */
class RawSocket {
  constructor(server, { query = { vsn: "2.0.0" }, protocols, headers } = {}) {
    this.url = server.wsUrl(query);
    this.ws = new WebSocket(this.url, protocols, { headers });
    rawSockets.add(this);
    this.frames = [];
    this.waiters = [];
    this.closeInfo = null;
    this.ws.on("message", (data, isBinary) => {
      let frame;
      if (isBinary) {
        frame = { binary: true, data: Buffer.from(data) };
      } else {
        const text = data.toString();
        let json;
        try {
          json = JSON.parse(text);
        } catch {
          json = undefined;
        }
        frame = { binary: false, text, json };
      }
      frame.at = Date.now();
      this.frames.push(frame);
      this._wake();
    });
    this.opened = new Promise((resolve, reject) => {
      this.ws.once("open", () => {
        this.openedAt = Date.now();
        resolve(this);
      });
      this.ws.once("unexpected-response", (req, res) => {
        const err = new Error(`WebSocket upgrade refused with HTTP ${res.statusCode}`);
        err.statusCode = res.statusCode;
        res.resume();
        reject(err);
      });
      this.ws.once("error", reject);
    });
    this.opened.catch(() => {});
    this.ws.on("error", () => {});
    this.closed = new Promise((resolve) => {
      this.ws.once("close", (code, reason) => {
        this.closeInfo = { code, reason: reason.toString(), at: Date.now() };
        rawSockets.delete(this);
        this._wake();
        resolve(this.closeInfo);
      });
    });
  }

  static async open(server, opts) {
    const raw = new RawSocket(server, opts);
    await withTimeout(raw.opened, DEFAULT_TIMEOUT_MS, `raw WebSocket to ${raw.url} to open`);
    return raw;
  }

  get protocol() {
    return this.ws.protocol;
  }

  /** Sends a message as a V2 JSON array, or any JSON value. */
  send(value) {
    this.ws.send(JSON.stringify(value));
  }

  /** Sends text or bytes as they are. */
  sendRaw(data, opts) {
    this.ws.send(data, opts);
  }

  _wake() {
    this.waiters = this.waiters.filter((w) => !w());
  }

  /**
   * Resolves the first received frame at index >= `from` (default: any so far) for which
   * predicate(frame) holds. Frames: {binary:false, text, json} or {binary:true, data}.
   */
  waitFrame(predicate, what, { timeout = DEFAULT_TIMEOUT_MS, from = 0 } = {}) {
    const p = new Promise((resolve, reject) => {
      const check = () => {
        for (let i = from; i < this.frames.length; i++) {
          if (predicate(this.frames[i])) {
            resolve(this.frames[i]);
            return true;
          }
        }
        if (this.closeInfo) {
          reject(
            new Error(
              `socket closed (code ${this.closeInfo.code}) while waiting for ${what}; frames: ${this.dump()}`
            )
          );
          return true;
        }
        return false;
      };
      if (!check()) this.waiters.push(check);
    });
    return withTimeout(p, timeout, `${what}; frames so far: ${this.dump()}`);
  }

  /** Resolves the first V2 JSON frame whose ref (index 1) equals `ref`. */
  reply(ref, opts) {
    return this.waitFrame(
      (f) => !f.binary && Array.isArray(f.json) && f.json[1] === ref,
      `a frame with ref ${JSON.stringify(ref)}`,
      opts
    ).then((f) => f.json);
  }

  /** Sends a V2 message and resolves the frame that carries its ref. */
  async call(joinRef, ref, topic, event, payload = {}) {
    this.send([joinRef, ref, topic, event, payload]);
    return this.reply(ref);
  }

  /** JSON frames received so far (V2 arrays or V1 objects). */
  jsonFrames() {
    return this.frames.filter((f) => !f.binary).map((f) => f.json);
  }

  dump() {
    const shown = this.frames.slice(-20).map((f) => (f.binary ? `<binary ${f.data.toString("hex")}>` : f.text));
    return shown.length ? shown.join(" | ") : "(none)";
  }

  close() {
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) {
      this.ws.terminate();
    }
    return this.closed;
  }
}

module.exports = {
  sseTransport,
  DEFAULT_TIMEOUT_MS,
  SERIALIZERS,
  LongPollV1,
  RawSocket,
  abandon,
  arrayBuffer,
  bytes,
  connect,
  countJoins,
  disconnect,
  disconnectAll,
  forEachSerializer,
  forEachTransport,
  join,
  joinResult,
  makeSocket,
  push,
  pushOk,
  pushResult,
  record,
  recordMessages,
  safeJson,
  transportClass,
  transports,
  uniqueTopic,
  waitForEvent,
  waitForMessage,
  waitForOpen,
  withTimeout,
};
