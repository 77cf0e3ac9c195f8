// SSETransport: Phoenix Channels over Server-Sent Events (down) and POST (up), for Fawkes's
// `{path}/sse` transport. Give it to phoenix.js as the Socket's transport:
//
//   import { Socket } from "phoenix";
//   import SSETransport from "./sse-transport.js";   // or <script src>: window.SSETransport
//   const socket = new Socket("/socket", { transport: SSETransport, params: { token } });
//
// No build step: plain JavaScript, loadable as a CommonJS module or a browser script (UMD).
// It uses the browser's EventSource and fetch. Where there is no global EventSource (Node.js
// before 22), set one: `SSETransport.EventSource = require("eventsource").EventSource`.
//
// The protocol: `GET …/sse?vsn=2.0.0&params` answers an event stream whose first event,
// `phx_session`, carries the session token; every other message event is one encoded message,
// with an `id`. Pushes go as `POST …/sse?token=T` (ndjson, batched per tick like LongPoll).
// A POST is answered as LongPoll's are: the status is in the JSON answer, `{"status": 200}`
// once all are taken, 410 for a session that is gone, 400 or 413 for a bad batch.
// When the stream drops, this transport reconnects once itself with the token and the last
// event id, so nothing is lost within the server's replay window; when that fails, or the server
// answers with a new session token, or a POST's status is not 200, it closes, and phoenix.js
// reconnects and rejoins as it does for any transport. EventSource cannot send headers, so the
// socket's `authToken` option travels as the `auth_token` query parameter of the opening GET:
// keep such URLs out of access logs, or prefer short-lived tokens.
(function (root, factory) {
  if (typeof module === "object" && module.exports) {
    module.exports = factory();
    module.exports.default = module.exports;
  } else {
    root.SSETransport = factory();
  }
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";

  const CONNECTING = 0;
  const OPEN = 1;
  const CLOSING = 2;
  const CLOSED = 3;

  function toBase64(buffer) {
    let binary = "";
    const bytes = new Uint8Array(buffer);
    for (let i = 0; i < bytes.byteLength; i++) binary += String.fromCharCode(bytes[i]);
    return btoa(binary);
  }

  class SSETransport {
    constructor(endPoint, protocols) {
      // phoenix.js hands the authToken over as a WebSocket subprotocol, as it does to LongPoll.
      const bearer = "base64url.bearer.phx.";
      this.authToken =
        protocols && protocols.length === 2 && protocols[1].startsWith(bearer)
          ? atob(protocols[1].slice(bearer.length))
          : null;
      this.url = endPoint
        .replace("ws://", "http://")
        .replace("wss://", "https://")
        .replace(/(.*)\/websocket/, "$1/sse");
      this.token = null;
      this.lastEventId = null;
      this.readyState = CONNECTING;
      this.resuming = false;
      this.source = null;
      this.batch = null;
      this.posting = false;
      this.aborts = new Set();
      this.onopen = function () {};
      this.onerror = function () {};
      this.onmessage = function () {};
      this.onclose = function () {};
      setTimeout(() => this.listen(), 0);
    }

    streamURL() {
      const sep = this.url.includes("?") ? "&" : "?";
      if (this.token === null) {
        return this.authToken === null ? this.url : `${this.url}${sep}auth_token=${encodeURIComponent(this.authToken)}`;
      }
      let url = `${this.url}${sep}token=${encodeURIComponent(this.token)}`;
      if (this.lastEventId !== null) url += `&last_event_id=${encodeURIComponent(this.lastEventId)}`;
      return url;
    }

    postURL() {
      const base = this.url.split("?")[0];
      return `${base}?token=${encodeURIComponent(this.token)}`;
    }

    listen() {
      if (this.readyState === CLOSED || this.readyState === CLOSING) return;
      const Impl = SSETransport.EventSource || (typeof EventSource !== "undefined" ? EventSource : null);
      if (!Impl) {
        this.onerror("no EventSource: set SSETransport.EventSource");
        return this.finish(1011, "no EventSource", false);
      }
      const source = new Impl(this.streamURL());
      this.source = source;
      source.addEventListener("phx_session", (e) => {
        if (this.token !== null && e.data !== this.token) {
          // The server could not resume our session and opened a new one: rejoin from scratch.
          return this.fail("session_gone", 3410);
        }
        this.token = e.data;
        this.resuming = false;
        if (this.readyState === CONNECTING) {
          this.readyState = OPEN;
          this.onopen({});
        }
      });
      source.addEventListener("phx_socket_close", (e) => this.finish(1000, e.data, false));
      source.onmessage = (e) => {
        if (e.lastEventId) this.lastEventId = e.lastEventId;
        this.onmessage({ data: e.data });
      };
      source.onerror = () => {
        // EventSource would retry the same URL, which opens a new session: take over instead.
        source.close();
        if (this.source !== source) return;
        if (this.readyState === OPEN && !this.resuming) {
          this.resuming = true;
          this.listen();
        } else {
          this.fail("stream error", 1006);
        }
      };
    }

    send(body) {
      if (typeof body !== "string") body = toBase64(body);
      if (this.batch) {
        this.batch.push(body);
      } else {
        this.batch = [body];
        if (!this.posting) setTimeout(() => this.flush(), 0);
      }
    }

    flush() {
      if (!this.batch || this.posting || this.readyState !== OPEN) return;
      const lines = this.batch;
      this.batch = null;
      this.posting = true;
      const abort = new AbortController();
      this.aborts.add(abort);
      fetch(this.postURL(), {
        method: "POST",
        headers: { "Content-Type": "application/x-ndjson" },
        body: lines.join("\n"),
        signal: abort.signal,
      })
        // As phoenix.js's LongPoll does, read the status from the JSON answer.
        .then((resp) => resp.json().catch(() => null))
        .then((answer) => {
          this.aborts.delete(abort);
          this.posting = false;
          const status = answer && answer.status;
          if (status === 200) return this.flush();
          this.fail(status === 410 ? "session_gone" : `POST answered ${status}`, status === 410 ? 3410 : 1011);
        })
        .catch((error) => {
          this.aborts.delete(abort);
          this.posting = false;
          if (this.readyState === OPEN) this.fail(error, 1011);
        });
    }

    fail(reason, code) {
      if (this.readyState === CLOSED) return;
      this.onerror(reason);
      this.finish(code, String(reason), false);
    }

    finish(code, reason, wasClean) {
      if (this.readyState === CLOSED) return;
      this.readyState = CLOSED;
      if (this.source) this.source.close();
      this.source = null;
      for (const abort of this.aborts) abort.abort();
      this.aborts.clear();
      this.batch = null;
      const event = { code, reason, wasClean };
      this.onclose(typeof CloseEvent !== "undefined" ? new CloseEvent("close", event) : event);
    }

    close(code, reason) {
      this.finish(code === undefined ? 1000 : code, reason, true);
    }
  }

  SSETransport.EventSource = null;
  SSETransport.CONNECTING = CONNECTING;
  SSETransport.OPEN = OPEN;
  SSETransport.CLOSING = CLOSING;
  SSETransport.CLOSED = CLOSED;
  return SSETransport;
});
