-- The classifiers' delivery ledger, against an image that kills the process (out of memory on a
-- huge decode, say) and would otherwise be read again and again. A classifier that hands a
-- partition over cleanly (every request it took finished, the offset committed) records the
-- offset it stopped at; one that takes a partition over at any other offset knows its last owner
-- stopped mid-way, and takes the next requests one at a time, counting each try here, until the
-- one that stops it has been tried DELIVERY_LIMIT times and is moved to the dead-letter topic.
CREATE TABLE classifier_partitions (
    group_id      text    NOT NULL,
    topic         text    NOT NULL,
    partition     integer NOT NULL,
    -- Where a clean handover left the partition; NULL while a classifier works on it.
    clean_offset  bigint,
    PRIMARY KEY (group_id, topic, partition)
);

CREATE TABLE classifier_attempts (
    group_id   text    NOT NULL,
    topic      text    NOT NULL,
    partition  integer NOT NULL,
    "offset"   bigint  NOT NULL,
    attempts   integer NOT NULL,
    PRIMARY KEY (group_id, topic, partition, "offset")
);
