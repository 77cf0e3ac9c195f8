"use strict";
// Spawns the Rust test server (`fawkes-test-server`) and tells when it is ready.
//
// CLI contract: `fawkes-test-server [--bind ADDR] [--heartbeat-timeout-ms N]`, default bind
// 127.0.0.1:0; once listening it prints exactly one stdout line `listening on http://HOST:PORT`.
// It exits cleanly on SIGTERM.
//
// Every server started here is killed when the test file's process ends (stopAll() in an
// `after` hook, plus exit/signal handlers as a safety net), so no process is ever left behind.

const { spawn } = require("node:child_process");
const fs = require("node:fs");
const path = require("node:path");

const REPO_ROOT = path.resolve(__dirname, "..", "..", "..");
const DEFAULT_BINARY = path.join(REPO_ROOT, "target", "debug", "fawkes-test-server");
const ARTIFACTS = path.resolve(__dirname, "..", ".artifacts");
const READY_RE = /^listening on http:\/\/(\S+):(\d+)\s*$/;
const READY_TIMEOUT_MS = Number(process.env.FAWKES_TEST_SERVER_READY_MS || 15000);
const STOP_GRACE_MS = 5000;

const live = new Set();

function binaryPath() {
  return process.env.FAWKES_TEST_SERVER || DEFAULT_BINARY;
}

function assertBinary() {
  const bin = binaryPath();
  try {
    fs.accessSync(bin, fs.constants.X_OK);
  } catch {
    throw new Error(
      `test server binary not found or not executable: ${bin}\n` +
        "build it with `cargo build -p fawkes-tests --bin fawkes-test-server`, " +
        "or point FAWKES_TEST_SERVER at it"
    );
  }
  return bin;
}

/** One running server process. */
class Server {
  constructor(child, host, port, logFile, tail) {
    this.child = child;
    this.host = host;
    this.port = port;
    this.pid = child.pid;
    this.httpUrl = `http://${host}:${port}`;
    /** Socket endpoint to hand to phoenix's Socket (the client appends /websocket). */
    this.url = `ws://${host}:${port}/socket`;
    this.logFile = logFile;
    this._tail = tail;
    this.exited = new Promise((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) {
        resolve({ code: child.exitCode, signal: child.signalCode });
      } else {
        child.once("exit", (code, signal) => resolve({ code, signal }));
      }
    });
  }

  /** Last lines the server printed (stdout and stderr), for error messages. */
  logs() {
    return this._tail.join("\n");
  }

  /** The raw WebSocket URL (`…/socket/websocket`) with the given query params. */
  wsUrl(query = {}) {
    const qs = new URLSearchParams(query).toString();
    return `${this.url}/websocket${qs ? `?${qs}` : ""}`;
  }

  /** SIGTERM, then SIGKILL if it has not exited within the grace period. Resolves {code, signal}. */
  async stop() {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill("SIGTERM");
      const timer = setTimeout(() => this.child.kill("SIGKILL"), STOP_GRACE_MS);
      const result = await this.exited;
      clearTimeout(timer);
      return result;
    }
    return this.exited;
  }

  /** SIGKILL at once. Resolves {code, signal} once the process is gone. */
  async kill() {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill("SIGKILL");
    }
    return this.exited;
  }

  /** Starts a new server process on the same host and port (after this one has exited). */
  restart(opts = {}) {
    return start({ ...opts, bind: `${this.host}:${this.port}` });
  }
}

function spawnOnce(opts) {
  const bin = opts.binary || assertBinary();
  const args = [];
  if (opts.bind) args.push("--bind", opts.bind);
  if (opts.heartbeatTimeoutMs != null) args.push("--heartbeat-timeout-ms", String(opts.heartbeatTimeoutMs));
  if (opts.args) args.push(...opts.args);

  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const child = spawn(bin, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, ...(opts.env || {}) },
  });
  live.add(child);
  child.once("exit", () => live.delete(child));

  const logFile = path.join(ARTIFACTS, `server-${process.pid}-${child.pid || "x"}.log`);
  const log = fs.createWriteStream(logFile);
  const tail = [];
  const remember = (stream, line) => {
    tail.push(`[${stream}] ${line}`);
    if (tail.length > 200) tail.shift();
    if (process.env.FAWKES_TEST_SERVER_LOG) process.stderr.write(`[server ${child.pid} ${stream}] ${line}\n`);
  };

  return new Promise((resolve, reject) => {
    let settled = false;
    let readyLines = 0;
    const settle = (fn, value) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      fn(value);
    };
    const describe = () =>
      `${bin} ${args.join(" ")} (pid ${child.pid})\n--- server output ---\n${tail.join("\n")}`;

    const lineReader = (stream, name, onLine) => {
      let buf = "";
      stream.setEncoding("utf8");
      // Keep draining both pipes for the whole life of the process, or a chatty server blocks.
      stream.on("data", (chunk) => {
        log.write(chunk);
        buf += chunk;
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl).replace(/\r$/, "");
          buf = buf.slice(nl + 1);
          remember(name, line);
          onLine && onLine(line);
        }
      });
      stream.on("end", () => {
        if (buf) remember(name, buf);
      });
    };

    lineReader(child.stdout, "stdout", (line) => {
      const m = (opts.readyRe || READY_RE).exec(line);
      if (!m) return;
      readyLines += 1;
      if (readyLines > 1) {
        // The contract says exactly one such line; a second one is worth shouting about.
        process.stderr.write(`fawkes-test-server printed a second ready line: ${line}\n`);
        return;
      }
      settle(resolve, new Server(child, m[1], Number(m[2]), logFile, tail));
    });
    lineReader(child.stderr, "stderr");

    child.once("error", (err) => settle(reject, new Error(`could not spawn ${bin}: ${err.message}`)));
    child.once("exit", (code, signal) => {
      log.end();
      const err = new Error(`server exited (code ${code}, signal ${signal}) before it was ready: ${describe()}`);
      err.exitedEarly = true;
      settle(reject, err);
    });
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      settle(reject, new Error(`server not ready within ${READY_TIMEOUT_MS} ms: ${describe()}`));
    }, READY_TIMEOUT_MS);
  });
}

/**
 * Starts a server and resolves once it printed its ready line.
 * opts: {bind, heartbeatTimeoutMs, args, env, binary, readyRe} (`binary` runs another program,
 * e.g. the `fawkes` server, whose ready line `readyRe` matches with host and port as groups). Resolves a Server: {url, port, httpUrl, stop(), kill(), restart()}.
 * When a fixed `bind` is given (restart on the same port), a server that exits before it is ready
 * (the port still held by the dying previous process) is tried again a few times.
 */
async function start(opts = {}) {
  const attempts = opts.bind && !/:0$/.test(opts.bind) ? 20 : 1;
  let lastErr;
  for (let i = 0; i < attempts; i++) {
    try {
      return await spawnOnce(opts);
    } catch (err) {
      lastErr = err;
      if (!err.exitedEarly) throw err;
      // Back off a little before binding again; this is a retry, not a synchronisation point.
      await new Promise((r) => setTimeout(r, 100 * (i + 1)));
    }
  }
  throw lastErr;
}

/** Stops every server this process started (SIGTERM, then SIGKILL). Use in `after`. */
async function stopAll() {
  const children = [...live];
  await Promise.all(
    children.map(
      (child) =>
        new Promise((resolve) => {
          if (child.exitCode !== null || child.signalCode !== null) return resolve();
          child.once("exit", resolve);
          child.kill("SIGTERM");
          setTimeout(() => child.kill("SIGKILL"), STOP_GRACE_MS).unref();
        })
    )
  );
}

function killAllSync() {
  for (const child of live) {
    try {
      child.kill("SIGKILL");
    } catch {
      /* already gone */
    }
  }
}

process.on("exit", killAllSync);
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.once(sig, () => {
    killAllSync();
    process.exit(128 + (sig === "SIGINT" ? 2 : sig === "SIGTERM" ? 15 : 1));
  });
}

module.exports = { start, stopAll, binaryPath, REPO_ROOT, Server };
