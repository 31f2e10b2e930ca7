//! The access log: one record per HTTP request and per ended TCP connection, written as JSON
//! (one object a line), the common log format or the combined one, to stdout or a file. The
//! data plane never waits on it: records go through a bounded channel to one writer thread
//! (a full channel drops the record and counts it), which buffers, flushes when it runs out of
//! work and at least every second, and reopens the file when asked (SIGUSR1, the admin API),
//! as logrotate expects.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use serde::Serialize;
use tokio::time::Instant;

/// Records waiting for the writer; beyond this they are dropped (and counted).
const QUEUE: usize = 16 * 1024;
/// The longest a written record waits in the buffer.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Where records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Stdout => f.write_str("stdout"),
            Target::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Why an access log setting or a reopen was refused.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("must be off, stdout or a file path")]
    EmptyTarget,
    #[error("unknown access log format {0:?} (expected json, common or combined)")]
    UnknownFormat(String),
    #[error("the access log writer has stopped")]
    Stopped,
    #[error("the access log writer did not answer")]
    NoAnswer,
    /// The file could not be opened again (the error names it).
    #[error("{0}")]
    Reopen(io::Error),
}

/// How a record is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    #[default]
    Json,
    /// Apache's common log format.
    Common,
    /// The common log format plus referer and user agent.
    Combined,
}

/// `off`, `stdout` or a file path; `None` is off.
pub fn parse_target(v: &str) -> Result<Option<Target>, AccessLogError> {
    match v {
        "" => Err(AccessLogError::EmptyTarget),
        "off" => Ok(None),
        "stdout" | "-" => Ok(Some(Target::Stdout)),
        path => Ok(Some(Target::File(PathBuf::from(path)))),
    }
}

impl FromStr for Format {
    type Err = AccessLogError;
    fn from_str(v: &str) -> Result<Format, AccessLogError> {
        match v {
            "json" => Ok(Format::Json),
            "common" => Ok(Format::Common),
            "combined" => Ok(Format::Combined),
            other => Err(AccessLogError::UnknownFormat(other.to_string())),
        }
    }
}

/// What was proxied: an HTTP request, or a TCP connection.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Record {
    /// When the request (or connection) started.
    pub time: Option<SystemTime>,
    pub client: Option<SocketAddr>,
    /// `None` for a TCP connection.
    pub http: Option<HttpPart>,
    /// Bytes from the client and to it (the whole request and response as they crossed).
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub pool: Option<String>,
    pub backend: Option<String>,
    /// Connecting to the backend (0 for a reused keep-alive connection).
    pub connect_ms: Option<f64>,
    /// From the request sent to the backend's response head.
    pub response_ms: Option<f64>,
    pub duration_ms: f64,
    pub sni: Option<Arc<str>>,
}

/// The HTTP side of a record.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HttpPart {
    pub method: String,
    /// The request target as the client sent it (path and query).
    pub path: String,
    pub protocol: &'static str,
    /// 0: no response was sent.
    pub status: u16,
    pub request_id: Option<String>,
    /// The EC gateway slot the request was pinned to.
    pub ec_pin: Option<u32>,
    pub user_agent: Option<String>,
    pub referer: Option<String>,
}

/// The JSON object of a record: every field named, absent values as `null`.
#[derive(Serialize)]
struct JsonLine<'a> {
    time: String,
    #[serde(rename = "type")]
    kind: &'static str,
    client: Option<String>,
    client_port: Option<u16>,
    method: Option<&'a str>,
    path: Option<&'a str>,
    protocol: &'a str,
    status: Option<u16>,
    bytes_in: u64,
    bytes_out: u64,
    pool: Option<&'a str>,
    backend: Option<&'a str>,
    connect_ms: Option<f64>,
    response_ms: Option<f64>,
    duration_ms: f64,
    request_id: Option<&'a str>,
    ec_pin: Option<u32>,
    sni: Option<&'a str>,
    user_agent: Option<&'a str>,
    referer: Option<&'a str>,
}

/// Milliseconds with microsecond precision, as logs show them.
fn ms(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// `rec` as one line (newline included) in `format`.
pub fn render(rec: &Record, format: Format) -> String {
    let mut line = match format {
        Format::Json => json(rec),
        Format::Common | Format::Combined => clf(rec, format == Format::Combined),
    };
    line.push('\n');
    line
}

fn json(rec: &Record) -> String {
    let h = rec.http.as_ref();
    let line = JsonLine {
        time: rfc3339(rec.time.unwrap_or(UNIX_EPOCH)),
        kind: if h.is_some() { "http" } else { "tcp" },
        client: rec.client.map(|c| c.ip().to_string()),
        client_port: rec.client.map(|c| c.port()),
        method: h.map(|h| h.method.as_str()),
        path: h.map(|h| h.path.as_str()),
        protocol: h.map_or("tcp", |h| h.protocol),
        status: h.map(|h| h.status).filter(|s| *s != 0),
        bytes_in: rec.bytes_in,
        bytes_out: rec.bytes_out,
        pool: rec.pool.as_deref(),
        backend: rec.backend.as_deref(),
        connect_ms: rec.connect_ms.map(ms),
        response_ms: rec.response_ms.map(ms),
        duration_ms: ms(rec.duration_ms),
        request_id: h.and_then(|h| h.request_id.as_deref()),
        ec_pin: h.and_then(|h| h.ec_pin),
        sni: rec.sni.as_deref(),
        user_agent: h.and_then(|h| h.user_agent.as_deref()),
        referer: h.and_then(|h| h.referer.as_deref()),
    };
    serde_json::to_string(&line).unwrap_or_default()
}

/// `host ident user [time] "request" status bytes` (+ ` "referer" "user agent"` combined).
/// A TCP connection's "request" is `TCP <pool> <backend>`.
fn clf(rec: &Record, combined: bool) -> String {
    let mut out = String::with_capacity(160);
    match rec.client {
        Some(c) => write!(out, "{}", c.ip()),
        None => write!(out, "-"),
    }
    .ok();
    out.push_str(" - - [");
    out.push_str(&clf_time(rec.time.unwrap_or(UNIX_EPOCH)));
    out.push_str("] \"");
    match &rec.http {
        Some(h) => {
            escaped(&mut out, &h.method);
            out.push(' ');
            escaped(&mut out, &h.path);
            out.push(' ');
            out.push_str(h.protocol);
        }
        None => {
            out.push_str("TCP ");
            escaped(&mut out, rec.pool.as_deref().unwrap_or("-"));
            out.push(' ');
            escaped(&mut out, rec.backend.as_deref().unwrap_or("-"));
        }
    }
    out.push_str("\" ");
    match rec.http.as_ref().map(|h| h.status).filter(|s| *s != 0) {
        Some(s) => write!(out, "{s} "),
        None => write!(out, "- "),
    }
    .ok();
    match rec.bytes_out {
        0 => out.push('-'),
        n => write!(out, "{n}").unwrap_or(()),
    }
    if combined {
        let h = rec.http.as_ref();
        for v in [h.and_then(|h| h.referer.as_deref()), h.and_then(|h| h.user_agent.as_deref())] {
            out.push_str(" \"");
            escaped(&mut out, v.unwrap_or("-"));
            out.push('"');
        }
    }
    out
}

/// Quotes, backslashes and control characters as `\xHH`, as Apache writes them: a client
/// cannot forge a field or a line.
fn escaped(out: &mut String, v: &str) {
    for ch in v.chars() {
        if ch == '"' || ch == '\\' || ch.is_control() {
            let mut b = [0u8; 4];
            for byte in ch.encode_utf8(&mut b).bytes() {
                let _ = write!(out, "\\x{byte:02x}");
            }
        } else {
            out.push(ch);
        }
    }
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

struct Utc {
    year: i64,
    month: u32,
    day: u32,
    hour: u64,
    minute: u64,
    second: u64,
    millis: u32,
}

fn utc(t: SystemTime) -> Utc {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (year, month, day) = civil((secs / 86_400) as i64);
    let rem = secs % 86_400;
    Utc { year, month, day, hour: rem / 3600, minute: rem % 3600 / 60, second: rem % 60, millis: d.subsec_millis() }
}

fn rfc3339(t: SystemTime) -> String {
    let u = utc(t);
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z", u.year, u.month, u.day, u.hour, u.minute, u.second, u.millis)
}

fn clf_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let u = utc(t);
    let month = MONTHS[(u.month as usize - 1) % 12];
    format!("{:02}/{month}/{:04}:{:02}:{:02}:{:02} +0000", u.day, u.year, u.hour, u.minute, u.second)
}

enum Msg {
    Record(Box<Record>),
    Reopen(SyncSender<Result<(), AccessLogError>>),
    Close,
}

/// The data plane's handle on the writer thread.
pub struct AccessLog {
    tx: SyncSender<Msg>,
    dropped: IntCounter,
    writer: Mutex<Option<JoinHandle<()>>>,
    target: Target,
}

impl AccessLog {
    /// Opens `target` (a file is created if missing, appended to) and starts the writer.
    pub fn start(target: Target, format: Format, dropped: IntCounter) -> io::Result<Arc<AccessLog>> {
        let out = open(&target)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let t = target.clone();
        let writer = std::thread::Builder::new()
            .name("shoal-access-log".into())
            .spawn(move || write_loop(&rx, out, &t, format))?;
        Ok(Arc::new(AccessLog { tx, dropped, writer: Mutex::new(Some(writer)), target }))
    }

    /// Queues a record; never waits (a full queue drops it, counted).
    pub fn log(&self, rec: Record) {
        match self.tx.try_send(Msg::Record(Box::new(rec))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Reopens the file (after logrotate moved it): records written before return are in the
    /// old file, later ones in the new. Blocks: call it off the data plane.
    pub fn reopen(&self) -> Result<(), AccessLogError> {
        let (done, wait) = mpsc::sync_channel(1);
        self.tx.send(Msg::Reopen(done)).map_err(|_| AccessLogError::Stopped)?;
        wait.recv_timeout(Duration::from_secs(10)).map_err(|_| AccessLogError::NoAnswer)?
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Writes out what is queued and stops the writer (at shutdown).
    pub fn close(&self) {
        let Some(writer) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        if self.tx.send(Msg::Close).is_ok() {
            let _ = writer.join();
        }
    }
}

type Out = BufWriter<Box<dyn Write + Send>>;

fn open(target: &Target) -> io::Result<Out> {
    let w: Box<dyn Write + Send> = match target {
        Target::Stdout => Box::new(io::stdout()),
        Target::File(path) => Box::new(open_file(path)?),
    };
    Ok(BufWriter::with_capacity(64 * 1024, w))
}

fn open_file(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn write_loop(rx: &Receiver<Msg>, mut out: Out, target: &Target, format: Format) {
    let mut last_flush = Instant::now();
    let mut failing = false;
    loop {
        let msg = match rx.try_recv() {
            Ok(m) => m,
            Err(_) => {
                // Out of work: what is buffered goes out now.
                flush(&mut out, &mut failing);
                last_flush = Instant::now();
                match rx.recv_timeout(FLUSH_EVERY) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        match msg {
            Msg::Record(rec) => {
                if let Err(e) = out.write_all(render(&rec, format).as_bytes()) {
                    report(&mut failing, &e);
                }
            }
            Msg::Reopen(done) => {
                flush(&mut out, &mut failing);
                let result = match target {
                    Target::Stdout => Ok(()),
                    Target::File(_) => open(target).map(|new| out = new).map_err(AccessLogError::Reopen),
                };
                if result.is_ok() {
                    failing = false;
                    tracing::info!(file = %target, "access log reopened");
                }
                let _ = done.send(result);
            }
            Msg::Close => break,
        }
        if last_flush.elapsed() >= FLUSH_EVERY {
            flush(&mut out, &mut failing);
            last_flush = Instant::now();
        }
    }
    flush(&mut out, &mut failing);
}

fn flush(out: &mut Out, failing: &mut bool) {
    if let Err(e) = out.flush() {
        report(failing, &e);
    }
}

/// A failing log (disk full) is reported once until a reopen, not once per record.
fn report(failing: &mut bool, e: &io::Error) {
    if !*failing {
        tracing::error!(error = %e, "cannot write the access log; records are lost until it can be written again");
        *failing = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http_record() -> Record {
        Record {
            time: Some(UNIX_EPOCH + Duration::from_millis(971_182_536_123)),
            client: Some("192.0.2.7:4242".parse().expect("addr")),
            http: Some(HttpPart {
                method: "GET".into(),
                path: "/a b\"c?q=1".into(),
                protocol: "HTTP/1.1",
                status: 200,
                request_id: Some("rid-1".into()),
                ec_pin: Some(3),
                user_agent: Some("curl/8".into()),
                referer: None,
            }),
            bytes_in: 80,
            bytes_out: 2326,
            pool: Some("web".into()),
            backend: Some("10.0.0.1:80".into()),
            connect_ms: Some(0.25),
            response_ms: Some(1.5),
            duration_ms: 2.0004,
            sni: Some("lb.test".into()),
        }
    }

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(civil(-1), (1969, 12, 31));
        let t = UNIX_EPOCH + Duration::from_millis(971_182_536_123);
        assert_eq!(rfc3339(t), "2000-10-10T12:55:36.123Z");
        assert_eq!(clf_time(t), "10/Oct/2000:12:55:36 +0000");
    }

    #[test]
    fn json_lines_name_every_field() {
        let line = render(&http_record(), Format::Json);
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["type"], "http");
        assert_eq!(v["client"], "192.0.2.7");
        assert_eq!(v["client_port"], 4242);
        assert_eq!(v["path"], "/a b\"c?q=1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["ec_pin"], 3);
        assert_eq!(v["sni"], "lb.test");
        assert_eq!(v["duration_ms"], 2.0);
        assert!(v["referer"].is_null());
        let tcp = Record { http: None, ..http_record() };
        let v: serde_json::Value = serde_json::from_str(&render(&tcp, Format::Json)).expect("json");
        assert_eq!((v["type"].as_str(), v["protocol"].as_str()), (Some("tcp"), Some("tcp")));
        assert!(v["status"].is_null() && v["method"].is_null());
    }

    #[test]
    fn clf_lines_escape_what_the_client_sent() {
        let rec = http_record();
        assert_eq!(
            render(&rec, Format::Common),
            "192.0.2.7 - - [10/Oct/2000:12:55:36 +0000] \"GET /a b\\x22c?q=1 HTTP/1.1\" 200 2326\n"
        );
        let combined = render(&rec, Format::Combined);
        assert!(combined.ends_with(" 200 2326 \"-\" \"curl/8\"\n"), "{combined}");
        let mut evil = rec.clone();
        evil.http.as_mut().expect("http").user_agent = Some("x\"\n\\y".into());
        assert!(render(&evil, Format::Combined).ends_with("\"x\\x22\\x0a\\x5cy\"\n"));
        let tcp = Record { http: None, bytes_out: 0, ..rec };
        assert!(render(&tcp, Format::Common).ends_with("] \"TCP web 10.0.0.1:80\" - -\n"));
    }

    #[test]
    fn targets_and_formats_parse() {
        assert_eq!(parse_target("off").expect("off"), None);
        assert_eq!(parse_target("stdout").expect("stdout"), Some(Target::Stdout));
        assert_eq!(parse_target("/var/log/a.log").expect("file"), Some(Target::File("/var/log/a.log".into())));
        assert!(matches!(parse_target(""), Err(AccessLogError::EmptyTarget)));
        assert_eq!("combined".parse::<Format>().expect("combined"), Format::Combined);
        let err = "xml".parse::<Format>().unwrap_err();
        assert!(matches!(&err, AccessLogError::UnknownFormat(f) if f == "xml"), "{err}");
        assert_eq!(err.to_string(), "unknown access log format \"xml\" (expected json, common or combined)");
    }

    #[test]
    fn the_writer_reopens_and_drops_when_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let dropped = IntCounter::new("d", "d").expect("counter");
        let log = AccessLog::start(Target::File(path.clone()), Format::Common, dropped.clone()).expect("start");
        log.log(http_record());
        let moved = dir.path().join("access.log.1");
        // Reopen flushes first, so the record is in the file that was renamed.
        std::fs::rename(&path, &moved).expect("rename");
        log.reopen().expect("reopen");
        log.log(http_record());
        log.close();
        assert_eq!(std::fs::read_to_string(&moved).expect("old").lines().count(), 1);
        assert_eq!(std::fs::read_to_string(&path).expect("new").lines().count(), 1);
        log.log(http_record());
        assert_eq!(dropped.get(), 1, "a stopped writer counts what it cannot take");
        assert!(matches!(log.reopen(), Err(AccessLogError::Stopped)), "nobody left to reopen");
    }
}
