-- What an Idempotency-Key was first used for (issue 20): a SHA-256 of the feed's format, source_url
-- and model and of the first bytes of its upload. A resend whose fingerprint differs is refused
-- (422 idempotency_key_reused) instead of "resuming" a different file. NULL for feeds created
-- before: any resend is taken as theirs, as before.
ALTER TABLE feeds ADD COLUMN fingerprint text;
