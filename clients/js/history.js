// FawkesHistory: nothing lost on reconnect, with the unmodified phoenix.js client.
//
// A Fawkes topic with history puts a position (`pos`, an opaque string) in each broadcast, and
// a join whose params carry `since: <the last position seen>` gets every broadcast after it, in
// order, before any live one. phoenix.js re-evaluates a channel's params on every rejoin when
// they are a function, so this helper gives the channel a params function that adds the last
// position it saw:
//
//   import { Socket } from "phoenix";
//   import FawkesHistory from "./history.js";   // or <script src>: window.FawkesHistory
//   const socket = new Socket("/socket");
//   socket.connect();
//   const feed = FawkesHistory.channel(socket, "feed:lobby", { user: "ann" }, {
//     onReset: (reply) => refetchEverything(),   // the server could not recover: start afresh
//   });
//   feed.on("new_msg", (msg) => show(msg));     // live and recovered broadcasts alike
//   feed.join();
//
// The join reply is `{pos, recovered}`. When `recovered` is false (first join, position too old,
// server restarted), nothing is replayed: the helper continues from the reply's `pos` and calls
// `onReset(reply)` when the join had asked for a position, so the application refetches its state. `FawkesHistory.last(feed)`
// is the last position seen (persist it to recover across page loads; pass it back as
// `{since}` in the fourth argument).
//
// No build step: plain JavaScript, loadable as a CommonJS module or a browser script (UMD).
(function (root, factory) {
  if (typeof module === "object" && module.exports) {
    module.exports = factory();
    module.exports.default = module.exports;
  } else {
    root.FawkesHistory = factory();
  }
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";

  const STATE = typeof Symbol === "function" ? Symbol("fawkesHistory") : "__fawkesHistory";

  /**
   * `socket.channel(topic, params)` whose every join carries `since` (the last position seen).
   * params: an object or a function returning one. opts: {since, onReset(reply), onRecovered(reply)}.
   */
  function channel(socket, topic, params, opts) {
    opts = opts || {};
    const state = { last: opts.since == null ? null : String(opts.since), joins: 0 };
    const ch = socket.channel(topic, function () {
      const base = typeof params === "function" ? params() : params || {};
      const out = Object.assign({}, base);
      if (state.last != null) out.since = state.last;
      return out;
    });
    track(ch, state, opts);
    return ch;
  }

  /** Follows positions on a channel made elsewhere (its params must add `since: last(ch)`). */
  function track(ch, state, opts) {
    state = state || { last: null, joins: 0 };
    opts = opts || {};
    ch[STATE] = state;
    const onMessage = ch.onMessage.bind(ch);
    ch.onMessage = function (event, payload, ref, joinRef) {
      if (event === "phx_reply") {
        const response = payload && payload.status === "ok" ? payload.response : null;
        if (response && ref != null && ref === ch.joinPush.ref && typeof response.recovered === "boolean") {
          // A join that carried a position and was not recovered missed something.
          const asked = state.last != null;
          state.joins++;
          if (response.recovered) {
            if (opts.onRecovered) opts.onRecovered(response);
          } else {
            // Nothing will be replayed: continue from now; the application refetches.
            if (typeof response.pos === "string") state.last = response.pos;
            if (asked && opts.onReset) opts.onReset(response);
          }
        }
      } else if (payload && typeof payload.pos === "string" && event.indexOf("chan_reply_") !== 0) {
        state.last = payload.pos;
      }
      return onMessage(event, payload, ref, joinRef);
    };
    return ch;
  }

  /** The last position `ch` saw, or null. */
  function last(ch) {
    const state = ch[STATE];
    return state ? state.last : null;
  }

  return { channel: channel, track: track, last: last };
});
