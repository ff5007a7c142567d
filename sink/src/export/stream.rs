//! An export under way: its query read on a connection of its own, in as many passes as its
//! format needs from one snapshot, each piece sent as the client reads it.

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::{FutureExt, StreamExt};
use reefline_schemas::ClassificationResult;
use sqlx::postgres::PgArguments;

use super::query::{Filters, Format};
use super::{Encode, Exports, Lines, Running, Selection, camtrap, coco, megadetector, table};
use crate::error::ApiError;
use reefline_store::sink::Row;

/// How many encoded bytes are sent to the client at a time.
const PIECE: usize = 64 * 1024;

/// An export under way: its query on a connection of its own, and the channel to its client.
struct Export {
    connection: sqlx::pool::PoolConnection<sqlx::Postgres>,
    /// The query, and what it binds (each pass binds the same).
    sql: String,
    arguments: PgArguments,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    /// Longest the client may take to read a piece.
    idle: std::time::Duration,
}

/// Sends a piece; false when the client went away or did not take it within `idle`, which ends
/// the export: its connection and snapshot are released rather than held by a client that
/// stopped reading.
async fn send(
    tx: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    idle: std::time::Duration,
    piece: std::io::Result<Bytes>,
) -> bool {
    let sent = matches!(tokio::time::timeout(idle, tx.send(piece)).await, Ok(Ok(())));
    if !sent {
        tracing::info!(idle_s = idle.as_secs(), "an export's client went away or stopped reading; ended");
    }
    sent
}

impl Export {
    /// Reads every result once, in order, giving each to `each`, which answers with a piece to
    /// send now, if any. False when the client went away or stopped reading; an error when the
    /// read or `each` failed.
    async fn pass(
        &mut self,
        mut each: impl FnMut(ClassificationResult) -> std::io::Result<Option<Bytes>>,
    ) -> std::io::Result<bool> {
        let mut rows = sqlx::query_as_with::<_, Row, _>(&self.sql, self.arguments.clone()).fetch(&mut *self.connection);
        loop {
            // A client that hangs up ends the export at once, not at its next piece (a selective
            // filter may read long between pieces).
            let row = tokio::select! {
                row = rows.next() => row,
                () = self.tx.closed() => return Ok(false),
            };
            let Some(row) = row else { return Ok(true) };
            if let Some(piece) = each(row.map_err(std::io::Error::other)?.into_result())?
                && !send(&self.tx, self.idle, Ok(piece)).await
            {
                return Ok(false);
            }
        }
    }

    /// A pass while the response is under way: a failure is sent to the client (which sees the
    /// body cut off) and ends the export.
    async fn read(&mut self, each: impl FnMut(ClassificationResult) -> std::io::Result<Option<Bytes>>) -> bool {
        match self.pass(each).await {
            Ok(read) => read,
            Err(e) => self.fail(e).await,
        }
    }

    async fn fail(&self, e: std::io::Error) -> bool {
        tracing::warn!(error = %e, "an export failed half-way");
        send(&self.tx, self.idle, Err(e)).await;
        false
    }

    /// Runs `sql` inside a transaction; false (the error sent) if it failed.
    async fn execute(&mut self, sql: &str) -> bool {
        match sqlx::query(sql).execute(&mut *self.connection).await {
            Ok(_) => true,
            Err(e) => self.fail(std::io::Error::other(e)).await,
        }
    }

    /// Every pass of `encoder`, then its end.
    async fn encode(&mut self, mut encoder: Box<dyn Encode>) -> bool {
        let passes = encoder.passes();
        for pass in 0..passes {
            if pass > 0 {
                encoder.next_pass();
            }
            let each = |result| {
                encoder.push(result);
                Ok((encoder.buffered() >= PIECE).then(|| encoder.take()))
            };
            if !self.read(each).await {
                return false;
            }
        }
        if passes > 1 && !self.execute("COMMIT").await {
            return false;
        }
        encoder.finish();
        send(&self.tx, self.idle, Ok(encoder.take())).await
    }

    /// A Camtrap DP package: the check pass, then either its refusal (`decide`d, the snapshot
    /// rolled back) or, `decide`d before its first byte, the package.
    async fn checked_camtrap(
        &mut self,
        mut plan: camtrap::Plan,
        decide: &mut impl FnMut(Result<(), ApiError>),
    ) -> bool {
        let read = self.pass(|r| {
            plan.check(&r);
            Ok(None)
        });
        match read.await {
            Ok(true) => {}
            // The client went away while the results were checked.
            Ok(false) => return false,
            Err(e) => {
                decide(Err(ApiError::Database(sqlx::Error::Io(e))));
                return false;
            }
        }
        if let Some(refusal) = plan.refusal() {
            let rolled_back = sqlx::query("ROLLBACK").execute(&mut *self.connection).await.is_ok();
            decide(Err(ApiError::Unexportable { missing: refusal.missing, message: refusal.message }));
            return rolled_back;
        }
        decide(Ok(()));
        self.camtrap(plan).await
    }

    /// The Camtrap DP package whose check pass gave `plan`: its head, the media and the
    /// observations, each read in a pass of its own.
    async fn camtrap(&mut self, plan: camtrap::Plan) -> bool {
        let out = camtrap::Shared::default();
        let mut archive = camtrap::Archive::new(out.clone());
        if let Err(e) = archive.write_head(&plan) {
            return self.fail(e).await;
        }
        for part in [camtrap::Part::Media, camtrap::Part::Observations] {
            let mut table = match archive.open(part) {
                Ok(table) => table,
                Err(e) => return self.fail(e).await,
            };
            let each = |r: ClassificationResult| {
                plan.write(part, &mut table, &r)?;
                Ok(out.take_at(PIECE))
            };
            if !self.read(each).await {
                return false;
            }
            if let Err(e) = camtrap::Archive::end_table(table) {
                return self.fail(e).await;
            }
        }
        if let Err(e) = archive.finish() {
            return self.fail(e).await;
        }
        if !self.execute("COMMIT").await {
            return false;
        }
        send(&self.tx, self.idle, Ok(out.take_at(0).unwrap_or_default())).await
    }
}

/// What an export writes: an encoder's format, or a Camtrap DP package (checked before it is answered).
enum Output {
    Encoded(Box<dyn Encode>),
    Camtrap(Box<camtrap::Plan>),
}

/// The encoder of `format` (any but Camtrap DP, whose options come with it); `what` (the feed's
/// or batch's id) names the COCO dataset.
fn encoder(
    format: Format,
    relative_to: Option<String>,
    exports: &Exports,
    columns: Vec<String>,
    what: &str,
) -> Box<dyn Encode> {
    match format {
        Format::Csv => Box::new(table::Table::new(columns)),
        Format::Ndjson => Box::<Lines>::default(),
        Format::MegaDetector => Box::new(megadetector::Batch::new(exports.classes.clone(), relative_to)),
        Format::Coco => Box::new(coco::Coco::new(exports.classes.clone(), what.to_owned())),
        Format::CamtrapDp => unreachable!("camtrap-dp's options are checked with its format, and come with it"),
    }
}

/// The export's task: its passes, each piece sent as the client reads it; `decided` is told when
/// a Camtrap DP package may be answered (or why not).
async fn run(
    mut export: Export,
    output: Output,
    running: Running,
    decided: tokio::sync::oneshot::Sender<Result<(), ApiError>>,
) {
    // Counted against its tenant until the task ends, or until it is refused: the refusal is
    // answered with the slot free, so that a client's next export, sent on it, finds room.
    let mut running = Some(running);
    let mut decided = Some(decided);
    let mut decide = |result: Result<(), ApiError>| {
        if result.is_err() {
            running.take();
        }
        if let Some(decided) = decided.take() {
            let _ = decided.send(result);
        }
    };
    let work = async {
        // Every pass reads the same results: one snapshot for them all.
        let passes = match &output {
            Output::Encoded(encoder) => encoder.passes(),
            Output::Camtrap(_) => 3,
        };
        if passes > 1
            && let Err(e) =
                sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *export.connection).await
        {
            decide(Err(ApiError::Database(e)));
            return false;
        }
        match output {
            Output::Encoded(encoder) => export.encode(encoder).await,
            Output::Camtrap(plan) => export.checked_camtrap(*plan, &mut decide).await,
        }
    };
    let finished = std::panic::AssertUnwindSafe(work)
        .catch_unwind()
        .await
        // A panic mid-way must not hand the connection back inside its read-only snapshot.
        .unwrap_or(false);
    if !finished {
        // Closing the socket of a query cut off mid-way ends it in Postgres at once, with its
        // snapshot; returned to the pool, it would go on until its rows were drained (or sit
        // inside its transaction).
        drop(export.connection.detach());
    }
}

/// Starts the query on a connection of its own and answers with its rows as they come.
pub(crate) async fn stream(
    exports: Exports,
    selection: Selection,
    filters: Filters,
    running: Running,
) -> Result<Response, ApiError> {
    let connection = exports.pool.acquire().await?;
    let format = filters.format;
    let Selection { sql, arguments, what, id, deployment, columns } = selection;
    let output = match filters.camtrap {
        Some(options) => {
            Output::Camtrap(Box::new(camtrap::Plan::new(options, exports.classes.clone(), what, id, deployment)))
        }
        None => Output::Encoded(encoder(format, filters.relative_to, &exports, columns, &format!("{what} {id}"))),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    let export = Export { connection, sql, arguments, tx, idle: exports.idle };
    // A Camtrap DP package is checked whole before anything is answered (a field it requires that
    // cannot be filled is a 422 naming it, never an invalid package): the task says when.
    let (decided, decision) = tokio::sync::oneshot::channel::<Result<(), ApiError>>();
    let waits = matches!(output, Output::Camtrap(_));
    tokio::spawn(run(export, output, running, decided));
    if waits {
        // A client that hangs up meanwhile drops this wait, and the task sees the body's channel close.
        decision.await.map_err(|_| ApiError::Database(sqlx::Error::PoolClosed))??;
    }
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) }));
    Ok((headers(format, what), body).into_response())
}

/// The export's content type, and its file name for a browser to save it under.
fn headers(format: Format, what: &str) -> [(header::HeaderName, String); 2] {
    let (content_type, extension) = match format {
        Format::Csv => ("text/csv; charset=utf-8", "csv"),
        Format::Ndjson => ("application/x-ndjson", "ndjson"),
        Format::MegaDetector | Format::Coco => ("application/json", "json"),
        Format::CamtrapDp => ("application/zip", "zip"),
    };
    let disposition = format!("attachment; filename=\"reefline-{what}-results.{extension}\"");
    [(header::CONTENT_TYPE, content_type.to_owned()), (header::CONTENT_DISPOSITION, disposition)]
}
