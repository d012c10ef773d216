//! The PostgreSQL schema, as numbered migrations. Each runs once, in order, in its own
//! transaction, recorded in `sluice_migrations`; an advisory lock makes nodes that start together
//! take turns, so the second finds the work done. Never edit a migration that has shipped: add
//! the next one. The tables are described in docs/scale-out.md.

use tokio_postgres::Client;

use crate::store::StoreError;

/// The advisory lock key that serializes migrations (any fixed number, the same on every node).
const LOCK: i64 = 0x5_11CE;

/// The migrations, in order; a migration's version is its position plus one.
const MIGRATIONS: &[&str] = &[
    // 1: streams, their chunks, and the nodes that run them.
    "CREATE TABLE streams (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        model TEXT NOT NULL,
        request TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        detail TEXT,
        created BIGINT NOT NULL,
        first_token_us BIGINT,
        total_us BIGINT,
        usage TEXT,
        chunk_count BIGINT NOT NULL DEFAULT 0,
        node TEXT
    );
    CREATE INDEX streams_by_tenant ON streams (tenant, seq);
    CREATE INDEX streams_running ON streams (node) WHERE status = 'streaming';
    CREATE TABLE chunks (
        stream_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        offset_us BIGINT NOT NULL,
        data TEXT NOT NULL,
        content TEXT NOT NULL,
        PRIMARY KEY (stream_id, seq)
    );
    CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        lease_until TIMESTAMPTZ NOT NULL
    );",
    // 2: per-key limits across nodes (see `limits`).
    "ALTER TABLE streams ADD COLUMN key_id TEXT;
    CREATE INDEX streams_running_by_key ON streams (key_id)
        WHERE status = 'streaming' AND key_id IS NOT NULL;
    CREATE TABLE key_buckets (
        key_id TEXT PRIMARY KEY,
        tokens DOUBLE PRECISION NOT NULL,
        updated TIMESTAMPTZ NOT NULL
    );
    CREATE FUNCTION sluice_begin_limited(p_id TEXT, p_tenant TEXT, p_model TEXT, p_request TEXT,
        p_created BIGINT, p_node TEXT, p_key TEXT, p_limit BIGINT) RETURNS BOOLEAN
    LANGUAGE plpgsql AS $$
    BEGIN
        -- One admission per key at a time, on every node; the count below then sees every
        -- stream recorded before (each statement of a function takes a fresh snapshot).
        PERFORM pg_advisory_xact_lock(hashtextextended('sluice key ' || p_key, 0));
        IF (SELECT count(*) FROM streams WHERE key_id = p_key AND status = 'streaming')
                >= p_limit THEN
            RETURN FALSE;
        END IF;
        INSERT INTO streams (id, tenant, model, request, status, created, node, key_id)
            VALUES (p_id, p_tenant, p_model, p_request, 'streaming', p_created, p_node, p_key)
            ON CONFLICT (id) DO NOTHING;
        RETURN TRUE;
    END $$;
    CREATE FUNCTION sluice_take_request(p_key TEXT, p_per_minute DOUBLE PRECISION)
        RETURNS DOUBLE PRECISION
    LANGUAGE plpgsql AS $$
    DECLARE
        have DOUBLE PRECISION;
        since TIMESTAMPTZ;
        now_ts TIMESTAMPTZ;
    BEGIN
        INSERT INTO key_buckets VALUES (p_key, p_per_minute, clock_timestamp())
            ON CONFLICT (key_id) DO NOTHING;
        SELECT tokens, updated INTO have, since FROM key_buckets WHERE key_id = p_key FOR UPDATE;
        now_ts := clock_timestamp();
        have := LEAST(p_per_minute,
            have + GREATEST(0, EXTRACT(EPOCH FROM now_ts - since)) * p_per_minute / 60);
        IF have >= 1 THEN
            UPDATE key_buckets SET tokens = have - 1, updated = now_ts WHERE key_id = p_key;
            RETURN NULL;
        END IF;
        UPDATE key_buckets SET tokens = have, updated = now_ts WHERE key_id = p_key;
        RETURN have;
    END $$;",
    // 3: a bucket's update commits without waiting for its WAL flush: losing the last few
    // milliseconds of a bucket to a database crash lets a few requests more through, while a
    // flush per request costs every limited request a disk sync.
    "CREATE OR REPLACE FUNCTION sluice_take_request(p_key TEXT, p_per_minute DOUBLE PRECISION)
        RETURNS DOUBLE PRECISION
    LANGUAGE plpgsql AS $$
    DECLARE
        have DOUBLE PRECISION;
        since TIMESTAMPTZ;
        now_ts TIMESTAMPTZ;
    BEGIN
        PERFORM set_config('synchronous_commit', 'off', true);
        INSERT INTO key_buckets VALUES (p_key, p_per_minute, clock_timestamp())
            ON CONFLICT (key_id) DO NOTHING;
        SELECT tokens, updated INTO have, since FROM key_buckets WHERE key_id = p_key FOR UPDATE;
        now_ts := clock_timestamp();
        have := LEAST(p_per_minute,
            have + GREATEST(0, EXTRACT(EPOCH FROM now_ts - since)) * p_per_minute / 60);
        IF have >= 1 THEN
            UPDATE key_buckets SET tokens = have - 1, updated = now_ts WHERE key_id = p_key;
            RETURN NULL;
        END IF;
        UPDATE key_buckets SET tokens = have, updated = now_ts WHERE key_id = p_key;
        RETURN have;
    END $$;",
    // 4: a routed stream's attempts (JSON).
    "ALTER TABLE streams ADD COLUMN attempts TEXT;",
];

/// The schema version this build expects.
pub(crate) const VERSION: i64 = MIGRATIONS.len() as i64;

/// Applies every migration the database lacks; returns how many it applied.
pub(crate) async fn apply(client: &mut Client) -> Result<usize, StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK])
        .await
        .map_err(StoreError::postgres)?;
    let applied = apply_locked(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK])
        .await
        .map_err(StoreError::postgres);
    let applied = applied?;
    unlocked?;
    Ok(applied)
}

async fn apply_locked(client: &mut Client) -> Result<usize, StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS sluice_migrations (
                version BIGINT PRIMARY KEY,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(StoreError::postgres)?;
    let current: i64 = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM sluice_migrations",
            &[],
        )
        .await
        .map_err(StoreError::postgres)?
        .get(0);
    if current > VERSION {
        return Err(StoreError::Internal(format!(
            "the database's schema is version {current}, newer than this sluice knows ({VERSION}): upgrade sluice"
        )));
    }
    let mut applied = 0;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i64 + 1;
        let tx = client.transaction().await.map_err(StoreError::postgres)?;
        tx.batch_execute(sql).await.map_err(StoreError::postgres)?;
        tx.execute(
            "INSERT INTO sluice_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(StoreError::postgres)?;
        tx.commit().await.map_err(StoreError::postgres)?;
        tracing::info!(version, "applied a store migration");
        applied += 1;
    }
    Ok(applied)
}
