-- Frames from database clients: each row is one inbound frame of the client `client_id`.
CREATE TABLE IF NOT EXISTS fawkes_inbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id   TEXT NOT NULL,
    frame       TEXT NOT NULL,
    inserted_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Every frame sent to a database client; `closed` (with a NULL frame) when its session ended.
CREATE TABLE IF NOT EXISTS fawkes_outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id   TEXT NOT NULL,
    frame       TEXT,
    closed      TEXT,
    inserted_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS fawkes_outbox_client ON fawkes_outbox (client_id, id);

-- How far each reader has delivered.
CREATE TABLE IF NOT EXISTS fawkes_cursors (
    name     TEXT PRIMARY KEY,
    position BIGINT NOT NULL
);

-- Rows that could not be used (a malformed frame, a payload that is not JSON), with why.
CREATE TABLE IF NOT EXISTS fawkes_dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    source      TEXT NOT NULL,
    row_id      BIGINT NOT NULL,
    error       TEXT NOT NULL,
    inserted_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- The demo's event table: every row becomes `event` on `topic` with {"id": id, "data": payload}.
CREATE TABLE IF NOT EXISTS fawkes_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    topic       TEXT NOT NULL,
    event       TEXT NOT NULL,
    payload     TEXT NOT NULL DEFAULT '{}',
    inserted_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS fawkes_events_topic ON fawkes_events (topic, id);
