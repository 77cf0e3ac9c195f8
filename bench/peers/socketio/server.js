// The Socket.IO peer of the Fawkes benchmarks: the same job as the Fawkes demo room.
//   join    (room, ack)  -> joins the room, acks {}
//   ping    (data, ack)  -> acks data unchanged
//   new_msg (data, ack)  -> emits new_msg {body, user} to everyone in data.room (the sender
//                           included, as a Phoenix broadcast), acks {}
// Usage: node server.js [port]   (default 4001; listens on 127.0.0.1, WebSocket transport only)
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");

const port = Number(process.argv[2] || process.env.PORT || 4001);
const httpServer = http.createServer((req, res) => {
  res.writeHead(404);
  res.end();
});
const io = new Server(httpServer, {
  transports: ["websocket"],
  serveClient: false,
  perMessageDeflate: false,
});

io.on("connection", (socket) => {
  socket.on("join", (room, ack) => {
    if (typeof room === "string") socket.join(room);
    if (typeof ack === "function") ack({});
  });
  socket.on("ping", (data, ack) => {
    if (typeof ack === "function") ack(data);
  });
  socket.on("new_msg", (data, ack) => {
    const room = data && typeof data.room === "string" ? data.room : null;
    if (room) io.to(room).emit("new_msg", { body: data.body === undefined ? null : data.body, user: "anonymous" });
    if (typeof ack === "function") ack({});
  });
});

httpServer.listen(port, "127.0.0.1", () => {
  console.error(`socket.io ${require("socket.io/package.json").version} listening on http://127.0.0.1:${port}`);
});
for (const signal of ["SIGINT", "SIGTERM"]) process.on(signal, () => process.exit(0));
