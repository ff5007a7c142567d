-- Images each tenant submitted each day (UTC), against TENANT_IMAGES_PER_DAY (issue 20): ingest
-- adds a submission's or a feed chunk's images before producing them, and refuses what would go
-- over. Shared by every ingest instance.
CREATE TABLE tenant_usage (
    tenant  text   NOT NULL,
    day     date   NOT NULL,
    images  bigint NOT NULL,
    PRIMARY KEY (tenant, day)
);
