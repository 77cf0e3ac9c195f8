-- The topics each database client has joined, so a restart resumes its session. Written in the
-- same transaction as the outbox rows and the inbox cursor.
CREATE TABLE IF NOT EXISTS fawkes_client_topics (
    client_id TEXT NOT NULL,
    topic     TEXT NOT NULL,
    join_ref  TEXT NOT NULL,
    params    TEXT NOT NULL,
    PRIMARY KEY (client_id, topic)
);

-- Dead letters are recorded once per row: looked up by row.
CREATE INDEX IF NOT EXISTS fawkes_dead_letters_row ON fawkes_dead_letters (source, row_id);
