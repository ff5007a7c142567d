-- One row per submission, from its request records: when it completed, whether its
-- BatchCompleted record is out, and the state of its callback.
CREATE TABLE batches (
    batch_id               text PRIMARY KEY,
    total                  integer     NOT NULL,
    callback_url           text,
    submitted_at           timestamptz NOT NULL,
    completed_at           timestamptz,
    event_produced_at      timestamptz,
    -- The callback: when it is next due (NULL once delivered or given up), and how it ended.
    callback_due_at        timestamptz,
    callback_delivered_at  timestamptz,
    callback_gave_up_at    timestamptz
);

CREATE INDEX batches_open ON batches (batch_id) WHERE completed_at IS NULL;
CREATE INDEX batches_outbox ON batches (completed_at) WHERE completed_at IS NOT NULL AND event_produced_at IS NULL;
CREATE INDEX batches_callbacks ON batches (callback_due_at) WHERE callback_due_at IS NOT NULL;

-- Every attempt to deliver a batch's callback and its outcome.
CREATE TABLE callback_attempts (
    batch_id    text        NOT NULL REFERENCES batches (batch_id),
    attempt     integer     NOT NULL,
    at          timestamptz NOT NULL,
    status      integer,
    error       text,
    PRIMARY KEY (batch_id, attempt)
);

-- Batches written before this migration: known from their requests.
INSERT INTO batches (batch_id, total, submitted_at)
SELECT batch_id, max(batch_size), min(submitted_at) FROM requests GROUP BY batch_id
ON CONFLICT DO NOTHING;
