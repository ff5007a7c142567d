-- How big a feed is where that is known (an upload's Content-Length, a source_url's), and how much
-- of it its reader had consumed at its last checkpoint: while a feed is still being read (fed to
-- the broker as its share of the classifiers frees), the sink estimates the lines to come from
-- them, and so the feed's finish.
ALTER TABLE feeds ADD COLUMN size_bytes bigint, ADD COLUMN read_bytes bigint NOT NULL DEFAULT 0;
