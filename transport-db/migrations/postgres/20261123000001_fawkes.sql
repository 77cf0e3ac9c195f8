-- Frames from database clients: each row is one inbound frame of the client `client_id`.
CREATE TABLE IF NOT EXISTS fawkes_inbox (
    id          BIGSERIAL PRIMARY KEY,
    client_id   TEXT NOT NULL,
    frame       TEXT NOT NULL,
    inserted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every frame sent to a database client; `closed` (with a NULL frame) when its session ended.
CREATE TABLE IF NOT EXISTS fawkes_outbox (
    id          BIGSERIAL PRIMARY KEY,
    client_id   TEXT NOT NULL,
    frame       TEXT,
    closed      TEXT,
    inserted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS fawkes_outbox_client ON fawkes_outbox (client_id, id);

-- How far each reader has delivered.
CREATE TABLE IF NOT EXISTS fawkes_cursors (
    name     TEXT PRIMARY KEY,
    position BIGINT NOT NULL
);

-- Rows that could not be used (a malformed frame, a payload that is not JSON), with why.
CREATE TABLE IF NOT EXISTS fawkes_dead_letters (
    id          BIGSERIAL PRIMARY KEY,
    source      TEXT NOT NULL,
    row_id      BIGINT NOT NULL,
    error       TEXT NOT NULL,
    inserted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The demo's event table: every row becomes `event` on `topic` with {"id": id, "data": payload}.
CREATE TABLE IF NOT EXISTS fawkes_events (
    id          BIGSERIAL PRIMARY KEY,
    topic       TEXT NOT NULL,
    event       TEXT NOT NULL,
    payload     JSONB NOT NULL DEFAULT '{}',
    inserted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS fawkes_events_topic ON fawkes_events (topic, id);

-- Wakes pollers at once (polling stays the safety net). `fawkes_notify_on(table)` adds the same
-- trigger to an application table.
CREATE OR REPLACE FUNCTION fawkes_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('fawkes_changes', TG_TABLE_NAME);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS fawkes_inbox_notify ON fawkes_inbox;
CREATE TRIGGER fawkes_inbox_notify AFTER INSERT ON fawkes_inbox
    FOR EACH STATEMENT EXECUTE FUNCTION fawkes_notify();
DROP TRIGGER IF EXISTS fawkes_events_notify ON fawkes_events;
CREATE TRIGGER fawkes_events_notify AFTER INSERT ON fawkes_events
    FOR EACH STATEMENT EXECUTE FUNCTION fawkes_notify();
