-- Every request the sink has seen on the requests topic, so that lookups can answer "pending"
-- (and a batch its total) before the first result exists.
CREATE TABLE requests (
    request_id   text PRIMARY KEY,
    batch_id     text        NOT NULL,
    batch_index  integer     NOT NULL,
    batch_size   integer     NOT NULL,
    url          text        NOT NULL,
    submitted_at timestamptz NOT NULL
);

CREATE INDEX requests_batch ON requests (batch_id);
