-- Bulk feeds (POST /v1/feeds on ingest). Ingest records each feed as it reads it: its counts, the
-- last line whose outcome is settled (a resent upload resumes after it), and every rejected line;
-- the sink serves them. Each chunk of a feed's accepted lines travels as a batch of its own.
CREATE TABLE feeds (
    feed_id          text PRIMARY KEY,
    -- The client's Idempotency-Key, scoped to the API key that sent it ('' when keys are off).
    key_scope        text        NOT NULL DEFAULT '',
    idempotency_key  text,
    format           text        NOT NULL,
    source_url       text,
    model            text,
    -- Metadata columns in the order the feed gave them (a CSV's header; NDJSON keys as first seen).
    columns          jsonb       NOT NULL DEFAULT '[]',
    -- reading: an upload is being read; interrupted: the upload broke off (resend it with the same
    -- Idempotency-Key); read: every line is accepted or rejected.
    state            text        NOT NULL CHECK (state IN ('reading', 'interrupted', 'read')),
    lines_read       bigint      NOT NULL DEFAULT 0,
    accepted         bigint      NOT NULL DEFAULT 0,
    rejected         bigint      NOT NULL DEFAULT 0,
    last_line        bigint      NOT NULL DEFAULT 0,
    chunks           integer     NOT NULL DEFAULT 0,
    -- The upload reading it now: a resend takes the feed over only once this one is gone.
    reader           uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- The reader's heartbeat: a feed 'reading' whose heartbeat is old lost its reader.
    updated_at       timestamptz NOT NULL DEFAULT now(),
    read_at          timestamptz,
    UNIQUE (key_scope, idempotency_key)
);

CREATE TABLE feed_rejects (
    feed_id  text   NOT NULL REFERENCES feeds (feed_id),
    line     bigint NOT NULL,
    reason   text   NOT NULL,
    -- The start of the line as it was sent.
    content  text   NOT NULL,
    PRIMARY KEY (feed_id, line)
);

ALTER TABLE results ADD COLUMN feed_id text, ADD COLUMN line bigint, ADD COLUMN metadata jsonb;

-- What is learned from each photo: the sha256 of its bytes (the classifier's result cache looks
-- predictions up by it), whether its predictions came from that cache, and its EXIF.
ALTER TABLE results ADD COLUMN sha256 text, ADD COLUMN cached boolean NOT NULL DEFAULT false, ADD COLUMN exif jsonb;
CREATE INDEX results_cache ON results (sha256, model_name, model_version) WHERE status = 'ok' AND sha256 IS NOT NULL;
CREATE INDEX results_feed ON results (feed_id, line) WHERE feed_id IS NOT NULL;
CREATE INDEX results_feed_completed ON results (feed_id, completed_at) WHERE feed_id IS NOT NULL;

-- GET /v1/results pages through results in completion order.
CREATE INDEX results_completed ON results (completed_at, request_id);

-- A feed is told done as a submission is: a batches row of kind 'feed' (its batch_id the feed_id),
-- written by ingest once the feed is read, completed by the sink once every accepted line has a
-- result; its BatchCompleted record and its callback come from that row. The batches its chunks
-- travel in ('feed_chunk') are tracked to know when that may be, and tell nobody themselves.
ALTER TABLE feeds ADD COLUMN callback_url text;
ALTER TABLE batches
    ADD COLUMN kind text NOT NULL DEFAULT 'submission' CHECK (kind IN ('submission', 'feed', 'feed_chunk')),
    ADD COLUMN feed_id text;
CREATE INDEX batches_open_chunks ON batches (feed_id) WHERE kind = 'feed_chunk' AND completed_at IS NULL;
CREATE INDEX batches_open_feeds ON batches (batch_id) WHERE kind = 'feed' AND completed_at IS NULL;
DROP INDEX batches_outbox;
CREATE INDEX batches_outbox ON batches (completed_at)
    WHERE completed_at IS NOT NULL AND event_produced_at IS NULL AND kind <> 'feed_chunk';
