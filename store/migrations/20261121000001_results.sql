-- One row per image request: its latest result.
CREATE TABLE results (
    request_id      text PRIMARY KEY,
    batch_id        text        NOT NULL,
    batch_index     integer     NOT NULL,
    batch_size      integer     NOT NULL,
    url             text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('ok', 'error')),
    predictions     jsonb       NOT NULL,
    marine_group    text,
    model_name      text        NOT NULL,
    model_version   text        NOT NULL,
    error_kind      text,
    error_message   text,
    submitted_at    timestamptz NOT NULL,
    completed_at    timestamptz NOT NULL,
    stored_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX results_batch ON results (batch_id, batch_index);
