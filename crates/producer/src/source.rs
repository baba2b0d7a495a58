//! Reads a segment export record by record, so memory does not grow with the segment: from a
//! local file (`file://`, inside `AE_PRODUCER__FILE_ROOT` only), over HTTP(S) or from S3
//! (`s3://bucket/key`), gzip-compressed or not, as NDJSON or CSV. Knows the record shape
//! (`external_id`, `email`, `phone`, `idfa`/`madid`, consent attributes) and nothing of sharding.
//! Never logs a record, and never logs nor reports a header value read from a source secret.
//!
//! Every source goes through the same layers: the transport's byte stream (a file, a response
//! body, an object's body; the remote ones with an idle timeout), the gzip decoder when the job,
//! the HTTP answer or the first two bytes say so, one buffer, then the format's reader, which
//! holds at most one record of `MAX_LINE_BYTES`. Nothing reads the whole body.

use async_compression::tokio::bufread::GzipDecoder;
use audience_export_core::config::ProducerSettings;
use audience_export_core::contract::{Compression, Source, SourceFormat};
use audience_export_core::Field;
use futures::TryStreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use std::future::Future;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader, ReadBuf};

/// What the reader may touch, from the producer's settings.
#[derive(Debug, Clone)]
pub struct SourceSettings {
    /// The only directory `file://` sources are read from; `None` refuses every `file://`.
    pub file_root: Option<PathBuf>,
    /// Where `source.headers_secret` names files of `Header-Name: value` lines; `None` refuses
    /// every job that names one.
    pub secrets_dir: Option<PathBuf>,
    /// Connecting, waiting for an answer, and waiting between two reads of a remote body.
    pub timeout: Duration,
}

impl SourceSettings {
    pub fn from_settings(producer: &ProducerSettings) -> SourceSettings {
        SourceSettings {
            file_root: producer.file_root.clone(),
            secrets_dir: producer.source_secrets_dir.clone(),
            timeout: Duration::from_millis(producer.source_timeout_ms.max(1)),
        }
    }
}

impl Default for SourceSettings {
    /// The producer's defaults: no file root, no secrets, 30 s.
    fn default() -> SourceSettings {
        SourceSettings::from_settings(&ProducerSettings::default())
    }
}

/// Why a source cannot be read. Each says whether trying again later may help (`retryable`);
/// none carries a header value from a source secret, nor a URL's query (a presigned URL's
/// signature).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source URL scheme `{0}` is not supported: use file://, https://, http:// or s3://")]
    Scheme(String),
    #[error("source URL is invalid: {0}")]
    Url(String),
    #[error("file:// sources are refused: this producer has no AE_PRODUCER__FILE_ROOT (the directory they may be read from)")]
    NoFileRoot,
    #[error("AE_PRODUCER__FILE_ROOT `{root}` cannot be used: {reason}")]
    FileRoot { root: String, reason: String },
    #[error("`{path}` is outside AE_PRODUCER__FILE_ROOT ({root}){}: file:// sources are read from inside it only", through(.through_symlink))]
    OutsideRoot {
        path: String,
        root: String,
        through_symlink: bool,
    },
    /// The job's `headers_secret` cannot be used. The reason names the secret and a line number,
    /// never a value.
    #[error("source.headers_secret: {0}")]
    Secret(String),
    #[error("the segment file cannot be opened: {0}")]
    Open(io::Error),
    #[error("the source answered HTTP {status}{detail}")]
    Status { status: u16, detail: String },
    #[error("the source could not be reached: {message}")]
    Connect { message: String, retryable: bool },
    #[error("the S3 object cannot be read: {message}")]
    Store { message: String, retryable: bool },
    #[error("the CSV header row cannot be read: {0}")]
    Header(String),
    #[error("the segment could not be read to its end: {}", brief(chain(.error)))]
    Read { error: io::Error, remote: bool },
}

impl SourceError {
    /// Whether reading the source again later may succeed: the answer of a server in trouble
    /// (HTTP 5xx, 429, 408), a timeout, a connection refused or cut, an S3 error object_store
    /// counts as transient. A bad URL, a scheme, a path outside the root, a bad secret reference,
    /// a 4xx, a missing file or object, a corrupt gzip stream: never.
    pub fn retryable(&self) -> bool {
        match self {
            SourceError::Scheme(_)
            | SourceError::Url(_)
            | SourceError::NoFileRoot
            | SourceError::FileRoot { .. }
            | SourceError::OutsideRoot { .. }
            | SourceError::Secret(_)
            | SourceError::Open(_)
            | SourceError::Header(_) => false,
            SourceError::Status { status, .. } => {
                *status == 408 || *status == 429 || (500..=599).contains(status)
            }
            SourceError::Connect { retryable, .. } | SourceError::Store { retryable, .. } => {
                *retryable
            }
            SourceError::Read { error, remote } => io_retryable(error, *remote),
        }
    }
}

fn through(symlink: &bool) -> &'static str {
    if *symlink {
        " through a symlink"
    } else {
        ""
    }
}

/// An error and its causes, `: `-separated (reqwest's and object_store's own texts are terse).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// At most 300 characters of an error's text: a server's answer (an S3 error document) may be
/// long, and the reason goes into a report and an email.
fn brief(mut text: String) -> String {
    const MAX: usize = 300;
    if text.len() > MAX {
        let mut end = MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// An I/O error while reading: retryable when the transport failed (a timeout, a reset, a body
/// cut short on a remote source), not when the bytes are wrong (a corrupt gzip stream).
fn io_retryable(error: &io::Error, remote: bool) -> bool {
    if let Some(inner) = error.get_ref() {
        if inner.is::<reqwest::Error>() {
            // An HTTP body's error is the transport's: the client decodes nothing (`no_gzip`),
            // so what it calls a decoding error is a body cut short or a chunk lost.
            return true;
        }
        if let Some(e) = inner.downcast_ref::<object_store::Error>() {
            return store_retryable(e);
        }
    }
    use io::ErrorKind::*;
    match error.kind() {
        TimedOut | ConnectionReset | ConnectionAborted | ConnectionRefused | BrokenPipe
        | NotConnected | Interrupted | WouldBlock => true,
        UnexpectedEof => remote,
        _ => false,
    }
}

/// reqwest's errors: a URL it cannot use, a redirect loop or a body it cannot decode are
/// permanent; the rest is the network's (connecting, sending, a body cut short, a timeout).
fn reqwest_retryable(e: &reqwest::Error) -> bool {
    if e.is_builder() || e.is_redirect() || e.is_decode() {
        return false;
    }
    match e.status() {
        Some(status) => {
            status.is_server_error()
                || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                || status == reqwest::StatusCode::REQUEST_TIMEOUT
        }
        None => true,
    }
}

/// object_store's errors, after its own retries (5xx, 429, connection errors and timeouts are
/// retried inside it for up to three minutes): what is left of a transport failure or a server
/// in trouble is still worth a later attempt; a missing object, a refused credential, a bad path
/// or configuration is not.
fn store_retryable(e: &object_store::Error) -> bool {
    use object_store::client::HttpErrorKind;
    use object_store::Error as E;
    match e {
        E::JoinError { .. } => true,
        E::Generic { source, .. } => {
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
            while let Some(c) = cause {
                if let Some(http) = c.downcast_ref::<object_store::client::HttpError>() {
                    return matches!(
                        http.kind(),
                        HttpErrorKind::Connect
                            | HttpErrorKind::Request
                            | HttpErrorKind::Timeout
                            | HttpErrorKind::Interrupted
                    );
                }
                cause = c.source();
            }
            // No transport error underneath: an answer's status. object_store does not export the
            // type that carries it, only its text ("... status code: 503 Service Unavailable").
            let text = chain(e);
            text.split("status code: ")
                .nth(1)
                .and_then(|rest| rest.get(..3))
                .and_then(|code| code.parse::<u16>().ok())
                .is_some_and(|code| code == 408 || code == 429 || (500..=599).contains(&code))
        }
        _ => false,
    }
}

/// One line of the segment: only the identifier fields are read; consent attributes are kept
/// for the consent filter.
#[derive(Debug, Default, Deserialize)]
pub struct SegmentRecord {
    #[serde(default)]
    pub external_id: Option<serde_json::Value>,
    #[serde(default)]
    email: Option<serde_json::Value>,
    #[serde(default)]
    phone: Option<serde_json::Value>,
    #[serde(default)]
    idfa: Option<serde_json::Value>,
    #[serde(default)]
    madid: Option<serde_json::Value>,
    /// Every other attribute (consent flags among them), as the segment wrote it.
    #[serde(flatten)]
    attributes: serde_json::Map<String, serde_json::Value>,
}

impl SegmentRecord {
    /// The raw value of a field, if the member has one. Numbers (phones exported as numbers)
    /// are taken as their decimal text; blank strings count as missing.
    pub fn value(&self, field: Field) -> Option<String> {
        let v = match field {
            Field::Email => self.email.as_ref(),
            Field::Phone => self.phone.as_ref(),
            Field::Madid => self.madid.as_ref().or(self.idfa.as_ref()),
        }?;
        match v {
            serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// A boolean attribute (a consent flag): `Some` only for a JSON `true` or `false` (in CSV,
    /// the cells `true` and `false`). Absent, null, empty or any other value is `None`, which the
    /// consent filter never reads as true.
    pub fn flag(&self, name: &str) -> Option<bool> {
        self.attributes
            .get(name)
            .and_then(serde_json::Value::as_bool)
    }

    /// A CSV row under its header: identifier columns as text, `true`/`false` as booleans, an
    /// empty cell as absent, anything else as text.
    fn from_cells<'a>(columns: &[Column], cells: impl Iterator<Item = &'a str>) -> SegmentRecord {
        let mut record = SegmentRecord::default();
        for (column, cell) in columns.iter().zip(cells) {
            if cell.is_empty() {
                continue;
            }
            let text = || Some(serde_json::Value::String(cell.to_owned()));
            match column {
                Column::ExternalId => record.external_id = text(),
                Column::Email => record.email = text(),
                Column::Phone => record.phone = text(),
                Column::Idfa => record.idfa = text(),
                Column::Madid => record.madid = text(),
                Column::Attribute(name) => {
                    let value = match cell {
                        "true" => serde_json::Value::Bool(true),
                        "false" => serde_json::Value::Bool(false),
                        other => serde_json::Value::String(other.to_owned()),
                    };
                    record.attributes.insert(name.clone(), value);
                }
            }
        }
        record
    }
}

/// The longest line read as a record. A member is a few hundred bytes; a line past this is not
/// one (a binary file, a missing newline): it is counted malformed and skipped without being
/// held in memory. In CSV, a row's cells and separators count (quotes do not).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// The buffer between the (decoded) bytes and the record reader.
const BUFFER_BYTES: usize = 256 * 1024;
/// The buffer the gzip decoder reads compressed bytes from.
const COMPRESSED_BUFFER_BYTES: usize = 64 * 1024;
/// The longest headers secret file read.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Bytes from a transport, possibly decompressed.
type Bytes = Box<dyn AsyncRead + Send + Unpin>;

/// A segment being read.
pub struct SegmentReader {
    reader: BufReader<Bytes>,
    format: Format,
    /// What identifies this very content (`SourceIdentity`).
    identity: String,
    /// Whether the bytes come over a network (a body cut short is then worth retrying).
    remote: bool,
}

enum Format {
    Ndjson { line: Vec<u8> },
    Csv(Box<Csv>),
}

/// Why a line is not a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Not a JSON object of the record's shape, or a CSV row with another number of cells than
    /// its header (invalid UTF-8 included).
    NotARecord,
    /// Longer than `MAX_LINE_BYTES`.
    TooLong,
}

/// One line's worth: a record, or a line that is not one.
pub enum Line {
    Record(SegmentRecord),
    Malformed(Malformed),
}

/// What a transport opened: its bytes, what identifies them, and whether the transfer itself is
/// gzip-encoded (`Content-Encoding: gzip`).
struct Opened {
    bytes: Bytes,
    identity: String,
    gzip_encoded: bool,
    remote: bool,
}

impl SegmentReader {
    /// Opens the job's source: nothing is read but the first bytes (to detect gzip) and, for CSV,
    /// the header row. Every refusal says why, in words for the requester.
    pub async fn open(
        source: &Source,
        settings: &SourceSettings,
    ) -> Result<SegmentReader, SourceError> {
        let url = url::Url::parse(&source.url).map_err(|e| SourceError::Url(e.to_string()))?;
        if source.headers_secret.is_some() && !matches!(url.scheme(), "http" | "https") {
            return Err(SourceError::Secret(format!(
                "a headers secret is sent to http:// and https:// sources only, not {}://",
                url.scheme()
            )));
        }
        let opened = match url.scheme() {
            "file" => open_file(&url, settings).await?,
            "http" | "https" => open_http(url, source, settings).await?,
            "s3" => open_s3(&url, settings).await?,
            other => return Err(SourceError::Scheme(other.to_owned())),
        };
        let remote = opened.remote;
        let read_error = |error| SourceError::Read { error, remote };
        let bytes = decode(opened.bytes, source.compression, opened.gzip_encoded)
            .await
            .map_err(read_error)?;
        let mut reader = BufReader::with_capacity(BUFFER_BYTES, bytes);
        let format = match source.format {
            SourceFormat::Ndjson => Format::Ndjson {
                line: Vec::with_capacity(1024),
            },
            SourceFormat::Csv => Format::Csv(Box::new(Csv::open(&mut reader, remote).await?)),
        };
        Ok(SegmentReader {
            reader,
            format,
            identity: opened.identity,
            remote,
        })
    }

    /// What identifies the content being read, so a resumed plan notices a replaced source: a
    /// file's size and modification time; an HTTP answer's `ETag`, `Last-Modified` and
    /// `Content-Length` (those it sent; with none of them, a value unique to this read, so a
    /// resume that published shards already fails rather than splice two contents); an S3
    /// object's ETag and size.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The next non-blank line (an NDJSON line, a CSV row), or None at the end. Bytes, not text:
    /// a line that is not UTF-8, not a record or too long is a malformed line, counted, never an
    /// error that stops the export. An error is the transport's (or a corrupt gzip stream).
    pub async fn next(&mut self) -> Result<Option<Line>, SourceError> {
        let remote = self.remote;
        let read_error = |error| SourceError::Read { error, remote };
        match &mut self.format {
            Format::Ndjson { line } => loop {
                line.clear();
                let (read, too_long) = read_line(&mut self.reader, line)
                    .await
                    .map_err(read_error)?;
                if read == 0 {
                    return Ok(None);
                }
                if too_long {
                    return Ok(Some(Line::Malformed(Malformed::TooLong)));
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(match serde_json::from_slice::<SegmentRecord>(line) {
                    Ok(record) => Line::Record(record),
                    Err(_) => Line::Malformed(Malformed::NotARecord),
                }));
            },
            Format::Csv(csv) => csv.next(&mut self.reader).await.map_err(read_error),
        }
    }
}

/// The gzip layer, when the job asks for it, the HTTP answer says the transfer is gzip-encoded,
/// or (the job saying nothing) the bytes start with gzip's magic number `1f 8b`. One layer at
/// most; concatenated gzip members are read as one stream (what `cat a.gz b.gz` makes).
async fn decode(
    bytes: Bytes,
    compression: Option<Compression>,
    gzip_encoded: bool,
) -> io::Result<Bytes> {
    let gzip = match compression {
        Some(Compression::Gzip) => true,
        Some(Compression::None) => gzip_encoded,
        None if gzip_encoded => true,
        None => {
            let (magic, bytes) = peek(bytes, 2).await?;
            if magic == [0x1f, 0x8b] {
                return Ok(gunzip(bytes));
            }
            return Ok(bytes);
        }
    };
    Ok(if gzip { gunzip(bytes) } else { bytes })
}

fn gunzip(bytes: Bytes) -> Bytes {
    let mut decoder = GzipDecoder::new(BufReader::with_capacity(COMPRESSED_BUFFER_BYTES, bytes));
    decoder.multiple_members(true);
    Box::new(decoder)
}

/// The first `n` bytes (fewer at the end), and the same stream with them put back in front.
async fn peek(mut bytes: Bytes, n: usize) -> io::Result<(Vec<u8>, Bytes)> {
    let mut head = Vec::with_capacity(n);
    while head.len() < n {
        let mut byte = [0u8; 1];
        if bytes.read(&mut byte).await? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let rest: Bytes = Box::new(io::Cursor::new(head.clone()).chain(bytes));
    Ok((head, rest))
}

/// A local file, only inside the file root: see `confine`.
async fn open_file(url: &url::Url, settings: &SourceSettings) -> Result<Opened, SourceError> {
    let path = url
        .to_file_path()
        .map_err(|()| SourceError::Url(format!("`{url}` names no local file")))?;
    let root = settings
        .file_root
        .as_deref()
        .ok_or(SourceError::NoFileRoot)?;
    let path = confine(&path, root).await?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(SourceError::Open)?;
    let meta = file.metadata().await.map_err(SourceError::Open)?;
    same_file(&path, &meta).await?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(Opened {
        bytes: Box::new(file),
        identity: format!("file:{}:{modified}", meta.len()),
        gzip_encoded: false,
        remote: false,
    })
}

/// The canonical form of `path` if it is inside the canonical `root`; nothing is opened. A path
/// that leaves the root lexically (`..`) is refused before the file system is asked anything
/// (so a refusal says nothing of what exists outside), then symlinks are resolved and the result
/// must still be inside.
async fn confine(path: &Path, root: &Path) -> Result<PathBuf, SourceError> {
    let root_error = |reason: String| SourceError::FileRoot {
        root: root.display().to_string(),
        reason,
    };
    if !root.is_absolute() {
        return Err(root_error("it is not an absolute path".into()));
    }
    let canonical_root = tokio::fs::canonicalize(root)
        .await
        .map_err(|e| root_error(e.to_string()))?;
    let outside = |through_symlink| SourceError::OutsideRoot {
        path: path.display().to_string(),
        root: root.display().to_string(),
        through_symlink,
    };
    let lexical = lexically_normal(path).ok_or_else(|| outside(false))?;
    if !lexical.starts_with(root) && !lexical.starts_with(&canonical_root) {
        return Err(outside(false));
    }
    let canonical = tokio::fs::canonicalize(&lexical)
        .await
        .map_err(SourceError::Open)?;
    if !canonical.starts_with(&canonical_root) {
        return Err(outside(true));
    }
    Ok(canonical)
}

/// `path` with `.` and `..` resolved without the file system; None if `..` climbs above `/`
/// or the path is relative.
fn lexically_normal(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::Prefix(_) => out.push(component),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() || !out.has_root() {
                    return None;
                }
            }
            Component::Normal(part) => out.push(part),
        }
    }
    out.has_root().then_some(out)
}

/// The file opened is the one `confine` checked: a symlink swapped in since is refused.
#[cfg(unix)]
async fn same_file(path: &Path, opened: &std::fs::Metadata) -> Result<(), SourceError> {
    use std::os::unix::fs::MetadataExt;
    let now = tokio::fs::symlink_metadata(path)
        .await
        .map_err(SourceError::Open)?;
    if (now.dev(), now.ino()) == (opened.dev(), opened.ino()) {
        Ok(())
    } else {
        Err(SourceError::Open(io::Error::other(
            "the file changed while it was being opened",
        )))
    }
}

#[cfg(not(unix))]
async fn same_file(_: &Path, _: &std::fs::Metadata) -> Result<(), SourceError> {
    Ok(())
}

/// An HTTP(S) GET, with the headers of the job's secret. Redirects are followed (10 at most),
/// but with secret headers only within the URL's origin: they are never sent elsewhere.
async fn open_http(
    url: url::Url,
    source: &Source,
    settings: &SourceSettings,
) -> Result<Opened, SourceError> {
    let headers = match &source.headers_secret {
        Some(name) => headers_secret(settings.secrets_dir.as_deref(), name).await?,
        None => HeaderMap::new(),
    };
    let origin = url.origin();
    let redirects = if headers.is_empty() {
        reqwest::redirect::Policy::limited(10)
    } else {
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.url().origin() != origin {
                attempt.stop()
            } else if attempt.previous().len() >= 10 {
                attempt.error("more than 10 redirects")
            } else {
                attempt.follow()
            }
        })
    };
    let client = reqwest::Client::builder()
        .connect_timeout(settings.timeout)
        .redirect(redirects)
        // The body is decoded here (`decode`), never by the client behind our back.
        .no_gzip()
        .build()
        .map_err(|e| SourceError::Connect {
            message: chain(&e.without_url()),
            retryable: false,
        })?;
    let request = client.get(url).headers(headers).send();
    let response = match tokio::time::timeout(settings.timeout, request).await {
        Err(_) => {
            return Err(SourceError::Connect {
                message: format!("no answer within {:?}", settings.timeout),
                retryable: true,
            })
        }
        Ok(Err(e)) => {
            return Err(SourceError::Connect {
                retryable: reqwest_retryable(&e),
                message: chain(&e.without_url()),
            })
        }
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    if !status.is_success() {
        let detail = match (status.canonical_reason(), status.is_redirection()) {
            (_, true) => " (a redirect to another origin is not followed with a headers secret, and other redirects are followed)".to_owned(),
            (Some(reason), false) => format!(" {reason}"),
            (None, false) => String::new(),
        };
        return Err(SourceError::Status {
            status: status.as_u16(),
            detail,
        });
    }
    let header = |name: reqwest::header::HeaderName| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    // We ask for no encoding (no `Accept-Encoding`); gzip is undone below, another is refused
    // rather than read as a segment.
    let encoding = header(reqwest::header::CONTENT_ENCODING)
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty() && e != "identity");
    let gzip_encoded = match encoding.as_deref() {
        None => false,
        Some("gzip" | "x-gzip") => true,
        Some(other) => {
            return Err(SourceError::Status {
                status: status.as_u16(),
                detail: format!(" with `Content-Encoding: {other}`, which is not read (gzip is)"),
            })
        }
    };
    let parts: Vec<String> = [
        ("etag", reqwest::header::ETAG),
        ("modified", reqwest::header::LAST_MODIFIED),
        ("length", reqwest::header::CONTENT_LENGTH),
    ]
    .into_iter()
    .filter_map(|(label, name)| header(name).map(|v| format!("{label}={v}")))
    .collect();
    let identity = if parts.is_empty() {
        format!("http:unidentified:{:016x}", rand::random::<u64>())
    } else {
        format!("http:{}", parts.join(":"))
    };
    let body = response
        .bytes_stream()
        .map_err(|e| io::Error::other(e.without_url()));
    Ok(Opened {
        bytes: Box::new(Idle::new(
            tokio_util::io::StreamReader::new(body),
            settings.timeout,
        )),
        identity,
        gzip_encoded,
        remote: true,
    })
}

/// The headers of a source secret: `<secrets_dir>/<name>`, read at every open (a rotated
/// Kubernetes Secret is picked up). Errors name the secret and a line, never a value.
async fn headers_secret(dir: Option<&Path>, name: &str) -> Result<HeaderMap, SourceError> {
    let dir = dir.ok_or_else(|| {
        SourceError::Secret(format!(
            "the job names the headers secret `{name}`, but this producer has no AE_PRODUCER__SOURCE_SECRETS_DIR"
        ))
    })?;
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !plain {
        return Err(SourceError::Secret(format!(
            "`{name}` is not a secret's name"
        )));
    }
    let path = dir.join(name);
    let unknown = || {
        SourceError::Secret(format!(
            "no headers secret named `{name}` in AE_PRODUCER__SOURCE_SECRETS_DIR"
        ))
    };
    let meta = match tokio::fs::metadata(&path).await {
        Ok(meta) if meta.is_file() => meta,
        Ok(_) => return Err(unknown()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(unknown()),
        Err(e) => {
            return Err(SourceError::Secret(format!(
                "the headers secret `{name}` cannot be read: {}",
                e.kind()
            )))
        }
    };
    if meta.len() > MAX_SECRET_BYTES {
        return Err(SourceError::Secret(format!(
            "the headers secret `{name}` is longer than {MAX_SECRET_BYTES} bytes"
        )));
    }
    let text = tokio::fs::read(&path).await.map_err(|e| {
        SourceError::Secret(format!(
            "the headers secret `{name}` cannot be read: {}",
            e.kind()
        ))
    })?;
    parse_headers(&text, name).map_err(SourceError::Secret)
}

/// `Header-Name: value` lines (blank lines and `#` comments skipped; the value trimmed). Every
/// value is marked sensitive (`Debug` prints no value). The error names a line, never a value.
fn parse_headers(text: &[u8], name: &str) -> Result<HeaderMap, String> {
    let text = std::str::from_utf8(text)
        .map_err(|_| format!("the headers secret `{name}` is not UTF-8 text"))?;
    let mut headers = HeaderMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((header, value)) = line.split_once(':') else {
            return Err(format!(
                "line {n} of the headers secret `{name}` is not `Header-Name: value`"
            ));
        };
        let header = HeaderName::from_bytes(header.trim().as_bytes()).map_err(|_| {
            format!("line {n} of the headers secret `{name}` does not start with a header name")
        })?;
        let value = value.trim();
        let mut value = HeaderValue::from_str(value)
            .ok()
            .filter(|_| !value.is_empty())
            .ok_or_else(|| {
                format!("line {n} of the headers secret `{name}`: the value of `{header}` is empty or not a valid header value")
            })?;
        value.set_sensitive(true);
        headers.append(header, value);
    }
    if headers.is_empty() {
        return Err(format!("the headers secret `{name}` holds no header"));
    }
    Ok(headers)
}

/// An S3 object through object_store: credentials, region and endpoint from the standard
/// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
/// `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, web identity, instance metadata...), as every AWS tool.
async fn open_s3(url: &url::Url, settings: &SourceSettings) -> Result<Opened, SourceError> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    use object_store::ObjectStoreExt;
    let bucket = url.host_str().filter(|b| !b.is_empty()).ok_or_else(|| {
        SourceError::Url("an s3:// URL names a bucket: s3://<bucket>/<key>".into())
    })?;
    let key = object_store::path::Path::from_url_path(url.path())
        .map_err(|e| SourceError::Url(e.to_string()))?;
    if key.as_ref().is_empty() {
        return Err(SourceError::Url(
            "an s3:// URL names an object: s3://<bucket>/<key>".into(),
        ));
    }
    // object_store's default would cut any request after 30 s, body included: a large object
    // streams for longer. Connecting is bounded here and a stalled body by `Idle`; AWS_*
    // client settings from the environment still win.
    let mut options = object_store::ClientOptions::new()
        .with_connect_timeout(settings.timeout)
        .with_timeout_disabled();
    for (name, value) in std::env::vars() {
        if let Some(rest) = name.strip_prefix("AWS_") {
            if let Ok(AmazonS3ConfigKey::Client(key)) =
                format!("aws_{}", rest.to_ascii_lowercase()).parse::<AmazonS3ConfigKey>()
            {
                options = options.with_config(key, value);
            }
        }
    }
    let store_error = |e: object_store::Error| {
        use object_store::Error as E;
        let object = format!("s3://{bucket}/{key}");
        let message = match &e {
            E::NotFound { .. } => format!("{object} does not exist"),
            E::PermissionDenied { .. } => format!(
                "reading {object} is denied: the producer's AWS credentials or the bucket's policy do not allow it"
            ),
            E::Unauthenticated { .. } => {
                format!("the producer's AWS credentials were refused reading {object}")
            }
            _ => brief(chain(&e)),
        };
        SourceError::Store {
            retryable: store_retryable(&e),
            message,
        }
    };
    let store = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_client_options(options)
        .build()
        .map_err(store_error)?;
    // object_store retries a 5xx, a 429 or a transport error itself (backing off for up to 3
    // minutes): a few of our timeouts leave it room for some of those before we give up.
    let got = match tokio::time::timeout(settings.timeout * 4, store.get(&key)).await {
        Ok(got) => got.map_err(store_error)?,
        Err(_) => {
            return Err(SourceError::Store {
                message: format!("no answer within {:?}", settings.timeout * 4),
                retryable: true,
            })
        }
    };
    let identity = match &got.meta.e_tag {
        Some(e_tag) => format!("s3:{e_tag}:{}", got.meta.size),
        None => format!(
            "s3:{}:{}",
            got.meta.last_modified.timestamp_nanos_opt().unwrap_or(0),
            got.meta.size
        ),
    };
    let body = got.into_stream().map_err(io::Error::other);
    Ok(Opened {
        bytes: Box::new(Idle::new(
            tokio_util::io::StreamReader::new(body),
            settings.timeout,
        )),
        identity,
        gzip_encoded: false,
        remote: true,
    })
}

/// A remote body that fails with `TimedOut` when no byte arrives for `timeout` while it is being
/// waited for (time the reader spends elsewhere, e.g. on the broker's confirms, does not count).
struct Idle<R> {
    inner: R,
    timeout: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    waiting: bool,
}

impl<R> Idle<R> {
    fn new(inner: R, timeout: Duration) -> Idle<R> {
        Idle {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            waiting: false,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Idle<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.waiting {
            let until = tokio::time::Instant::now() + this.timeout;
            this.deadline.as_mut().reset(until);
            this.waiting = true;
        }
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.waiting = false;
                Poll::Ready(result)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no data from the source for {:?}", this.timeout),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// Reads one line (without its newline) into `line`, keeping at most `MAX_LINE_BYTES`: returns
/// the bytes consumed (0 at the end) and whether the line was longer than that (its rest is
/// consumed and dropped).
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> io::Result<(usize, bool)> {
    let (mut consumed, mut too_long) = (0, false);
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok((consumed, too_long));
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if !too_long && line.len() + chunk.len() <= MAX_LINE_BYTES {
            line.extend_from_slice(chunk);
        } else {
            too_long = true;
            line.clear();
        }
        let used = done.unwrap_or(available.len());
        reader.consume(used);
        consumed += used;
        if done.is_some() {
            return Ok((consumed, too_long));
        }
    }
}

/// A CSV column, named by the header row.
#[derive(Debug, Clone, PartialEq)]
enum Column {
    ExternalId,
    Email,
    Phone,
    Idfa,
    Madid,
    Attribute(String),
}

impl Column {
    fn named(name: &str) -> Column {
        match name {
            "external_id" => Column::ExternalId,
            "email" => Column::Email,
            "phone" => Column::Phone,
            "idfa" => Column::Idfa,
            "madid" => Column::Madid,
            other => Column::Attribute(other.to_owned()),
        }
    }
}

/// RFC 4180 CSV (quoted fields, `""` inside quotes, CRLF or LF, blank lines skipped) through
/// csv-core, a push parser over our own buffer: a row is held once, in `out`, and never more
/// than `MAX_LINE_BYTES` of it.
struct Csv {
    parser: csv_core::Reader,
    columns: Vec<Column>,
    /// The current row's unquoted cells, back to back; grown on demand up to the limit.
    out: Vec<u8>,
    out_len: usize,
    /// Where each cell of the current row ends in `out`.
    ends: Vec<usize>,
    ends_len: usize,
}

/// One row as csv-core parsed it.
enum Row {
    Cells,
    TooLong,
    End,
}

impl Csv {
    /// Reads the header row: its cells (trimmed, a UTF-8 byte order mark dropped) name the
    /// columns.
    async fn open<R: AsyncBufRead + Unpin>(
        reader: &mut R,
        remote: bool,
    ) -> Result<Csv, SourceError> {
        let mut csv = Csv {
            parser: csv_core::Reader::new(),
            columns: Vec::new(),
            out: vec![0; 4096],
            out_len: 0,
            ends: vec![0; 64],
            ends_len: 0,
        };
        let row = csv
            .row(reader)
            .await
            .map_err(|error| SourceError::Read { error, remote })?;
        match row {
            Row::End => {}
            Row::TooLong => {
                return Err(SourceError::Header(format!(
                    "it is longer than {MAX_LINE_BYTES} bytes"
                )))
            }
            Row::Cells => {
                let mut columns = Vec::with_capacity(csv.ends_len);
                for (i, cell) in csv.cells().enumerate() {
                    let mut name = std::str::from_utf8(cell)
                        .map_err(|_| SourceError::Header("it is not UTF-8".into()))?;
                    if i == 0 {
                        name = name.trim_start_matches('\u{feff}');
                    }
                    columns.push(Column::named(name.trim()));
                }
                csv.columns = columns;
            }
        }
        Ok(csv)
    }

    async fn next<R: AsyncBufRead + Unpin>(&mut self, reader: &mut R) -> io::Result<Option<Line>> {
        Ok(Some(match self.row(reader).await? {
            Row::End => return Ok(None),
            Row::TooLong => Line::Malformed(Malformed::TooLong),
            Row::Cells if self.ends_len != self.columns.len() => {
                Line::Malformed(Malformed::NotARecord)
            }
            Row::Cells => {
                let mut cells = Vec::with_capacity(self.ends_len);
                for cell in self.cells() {
                    match std::str::from_utf8(cell) {
                        Ok(cell) => cells.push(cell),
                        Err(_) => return Ok(Some(Line::Malformed(Malformed::NotARecord))),
                    }
                }
                Line::Record(SegmentRecord::from_cells(&self.columns, cells.into_iter()))
            }
        }))
    }

    /// The current row's cells.
    fn cells(&self) -> impl Iterator<Item = &[u8]> {
        let ends = &self.ends[..self.ends_len];
        ends.iter().enumerate().map(|(i, &end)| {
            let start = if i == 0 { 0 } else { ends[i - 1] };
            &self.out[start..end]
        })
    }

    /// Parses the next row into `out`/`ends`. A row whose cells and separators pass
    /// `MAX_LINE_BYTES` is consumed to its end without being kept (`TooLong`).
    async fn row<R: AsyncBufRead + Unpin>(&mut self, reader: &mut R) -> io::Result<Row> {
        use csv_core::ReadRecordResult as R;
        self.out_len = 0;
        self.ends_len = 0;
        let mut too_long = false;
        loop {
            let input = reader.fill_buf().await?;
            let (result, read, written, ended) = self.parser.read_record(
                input,
                &mut self.out[self.out_len..],
                &mut self.ends[self.ends_len..],
            );
            reader.consume(read);
            self.out_len += written;
            self.ends_len += ended;
            // A row of N bytes without quotes is N - (cells - 1) bytes of cells in `cells`
            // pieces: the cells' bytes plus their count is the row's length plus one.
            if !too_long && self.out_len + self.ends_len > MAX_LINE_BYTES + 1 {
                too_long = true;
            }
            if too_long {
                // Parsed to find the row's end, not kept: the buffers are reused from the start
                // (csv-core keeps its own position; the end offsets it writes are ignored).
                self.out_len = 0;
                self.ends_len = 0;
            }
            match result {
                R::InputEmpty => {}
                R::OutputFull => grow(&mut self.out, self.out_len),
                R::OutputEndsFull => grow(&mut self.ends, self.ends_len),
                R::Record if too_long => return Ok(Row::TooLong),
                R::Record => return Ok(Row::Cells),
                R::End => return Ok(Row::End),
            }
        }
    }
}

/// Doubles a row buffer that is full, up to the size a row may reach (past it the row is too
/// long and the buffer is reused from its start).
fn grow<T: Default + Clone>(buffer: &mut Vec<T>, used: usize) {
    if used == buffer.len() {
        let size = (buffer.len() * 2).min(MAX_LINE_BYTES + 2).max(used + 1);
        buffer.resize(size, T::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap as Headers, StatusCode};
    use axum::routing::get;

    /// A directory of the test's own, used as the file root; removed at the end.
    struct Root(PathBuf);

    impl Root {
        fn new() -> Root {
            let dir =
                std::env::temp_dir().join(format!("ae-source-{:016x}", rand::random::<u64>()));
            std::fs::create_dir_all(&dir).unwrap();
            Root(dir)
        }

        fn settings(&self) -> SourceSettings {
            SourceSettings {
                file_root: Some(self.0.clone()),
                ..SourceSettings::default()
            }
        }

        /// Writes `bytes` to `name` in the root; returns its file:// URL.
        fn write(&self, name: &str, bytes: &[u8]) -> String {
            let path = self.0.join(name);
            std::fs::write(&path, bytes).unwrap();
            url::Url::from_file_path(&path).unwrap().to_string()
        }
    }

    impl Drop for Root {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn source(url: &str, format: SourceFormat, compression: Option<Compression>) -> Source {
        Source {
            url: url.to_owned(),
            format,
            compression,
            headers_secret: None,
        }
    }

    /// Every line of a source: a record's email, or why the line is not a record.
    async fn emails(
        source: &Source,
        settings: &SourceSettings,
    ) -> Vec<Result<Option<String>, Malformed>> {
        let mut reader = SegmentReader::open(source, settings).await.unwrap();
        let mut out = Vec::new();
        while let Some(line) = reader.next().await.unwrap() {
            out.push(match line {
                Line::Record(r) => Ok(r.value(Field::Email)),
                Line::Malformed(m) => Err(m),
            });
        }
        out
    }

    async fn lines_of(bytes: &[u8]) -> Vec<Result<Option<String>, Malformed>> {
        let root = Root::new();
        let url = root.write("segment.ndjson", bytes);
        emails(&source(&url, SourceFormat::Ndjson, None), &root.settings()).await
    }

    async fn csv_records(bytes: &[u8]) -> Vec<Result<SegmentRecord, Malformed>> {
        let root = Root::new();
        let url = root.write("segment.csv", bytes);
        let mut reader =
            SegmentReader::open(&source(&url, SourceFormat::Csv, None), &root.settings())
                .await
                .unwrap();
        let mut out = Vec::new();
        while let Some(line) = reader.next().await.unwrap() {
            out.push(match line {
                Line::Record(r) => Ok(r),
                Line::Malformed(m) => Err(m),
            });
        }
        out
    }

    async fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        async_compression::tokio::bufread::GzipEncoder::new(bytes)
            .read_to_end(&mut out)
            .await
            .unwrap();
        out
    }

    #[tokio::test]
    async fn bad_bytes_and_huge_lines_are_malformed_lines_and_reading_goes_on() {
        let mut bytes = b"{\"email\":\"a@x.io\"}\n".to_vec();
        bytes.extend_from_slice(b"{\"email\":\"\xff\xfe@x.io\"}\n");
        bytes.extend_from_slice(b"\n   \n");
        bytes.extend_from_slice(b"{\"email\":\"");
        bytes.extend(std::iter::repeat_n(b'z', MAX_LINE_BYTES + 10));
        bytes.extend_from_slice(b"@x.io\"}\n");
        bytes.extend_from_slice(b"not json\n");
        bytes.extend_from_slice(b"{\"email\":\"b@x.io\"}");
        let got = lines_of(&bytes).await;
        assert_eq!(
            got,
            vec![
                Ok(Some("a@x.io".to_owned())),
                Err(Malformed::NotARecord),
                Err(Malformed::TooLong),
                Err(Malformed::NotARecord),
                Ok(Some("b@x.io".to_owned())),
            ]
        );
    }

    #[tokio::test]
    async fn a_line_of_exactly_the_limit_is_read() {
        let mut bytes = b"{\"email\":\"".to_vec();
        let filler = MAX_LINE_BYTES - bytes.len() - "@x.io\"}".len();
        bytes.extend(std::iter::repeat_n(b'z', filler));
        bytes.extend_from_slice(b"@x.io\"}\n");
        assert_eq!(bytes.len(), MAX_LINE_BYTES + 1, "the line and its newline");
        let got = lines_of(&bytes).await;
        assert!(matches!(got.as_slice(), [Ok(Some(_))]), "{:?}", got.len());
    }

    #[test]
    fn values_are_read_from_strings_and_numbers() {
        let r: SegmentRecord = serde_json::from_str(
            r#"{"email":" A@x.io ","phone":15551234567,"idfa":"ABC","ads_tracking_enabled":true}"#,
        )
        .unwrap();
        assert_eq!(r.value(Field::Email).as_deref(), Some(" A@x.io "));
        assert_eq!(r.value(Field::Phone).as_deref(), Some("15551234567"));
        assert_eq!(r.value(Field::Madid).as_deref(), Some("ABC"));
        assert_eq!(r.flag("ads_tracking_enabled"), Some(true));
        assert_eq!(r.flag("do_not_sell_or_share"), None);
        let blank: SegmentRecord = serde_json::from_str(r#"{"email":"  ","phone":null}"#).unwrap();
        assert_eq!(blank.value(Field::Email), None);
        assert_eq!(blank.value(Field::Phone), None);
    }

    #[tokio::test]
    async fn csv_reads_quoted_cells_crlf_empty_cells_and_booleans() {
        let bytes = [
            &b"\xef\xbb\xbfemail,phone,madid,ads_tracking_enabled,do_not_sell_or_share,note\r\n"[..],
            b"\"a@x.io\",\"+1 (555) 123-4567\",,true,false,\"said \"\"hi, there\"\"\r\nand left\"\r\n",
            b"\r\n",
            b" B@x.io ,15551234567,ABC,TRUE,,\r\n",
            b",,,,,\r\n",
            b"c@x.io,,,false,true,last row without a newline",
        ]
        .concat();
        let got = csv_records(&bytes).await;
        assert_eq!(
            got.len(),
            4,
            "the blank line is skipped, the others are records"
        );
        let rows: Vec<_> = got.into_iter().map(Result::unwrap).collect();
        assert_eq!(rows[0].value(Field::Email).as_deref(), Some("a@x.io"));
        assert_eq!(
            rows[0].value(Field::Phone).as_deref(),
            Some("+1 (555) 123-4567")
        );
        assert_eq!(rows[0].value(Field::Madid), None, "an empty cell is absent");
        assert_eq!(rows[0].flag("ads_tracking_enabled"), Some(true));
        assert_eq!(rows[0].flag("do_not_sell_or_share"), Some(false));
        assert_eq!(
            rows[0].attributes.get("note"),
            Some(&serde_json::Value::String(
                "said \"hi, there\"\r\nand left".into()
            )),
            "quotes, a comma and a line break inside a quoted cell"
        );
        assert_eq!(rows[1].value(Field::Email).as_deref(), Some(" B@x.io "));
        assert_eq!(rows[1].value(Field::Phone).as_deref(), Some("15551234567"));
        assert_eq!(rows[1].value(Field::Madid).as_deref(), Some("ABC"));
        assert_eq!(
            rows[1].flag("ads_tracking_enabled"),
            None,
            "only `true` and `false` are booleans"
        );
        assert_eq!(
            rows[1].flag("do_not_sell_or_share"),
            None,
            "an empty cell is absent"
        );
        for field in Field::ALL {
            assert_eq!(
                rows[2].value(field),
                None,
                "a row of empty cells has no value"
            );
        }
        assert_eq!(rows[3].value(Field::Email).as_deref(), Some("c@x.io"));
        assert_eq!(rows[3].flag("do_not_sell_or_share"), Some(true));
    }

    #[tokio::test]
    async fn csv_idfa_and_madid_columns_are_the_device_id() {
        let got = csv_records(b"external_id,idfa\nu1,IDFA-1\nu2,\n").await;
        let rows: Vec<_> = got.into_iter().map(Result::unwrap).collect();
        assert_eq!(rows[0].value(Field::Madid).as_deref(), Some("IDFA-1"));
        assert_eq!(
            rows[0].external_id,
            Some(serde_json::Value::String("u1".into()))
        );
        assert_eq!(rows[1].value(Field::Madid), None);
    }

    #[tokio::test]
    async fn csv_ragged_rows_bad_bytes_and_huge_rows_are_malformed_and_reading_goes_on() {
        let mut bytes = b"email,phone\n".to_vec();
        bytes.extend_from_slice(b"short@x.io\n");
        bytes.extend_from_slice(b"long@x.io,1,extra\n");
        bytes.extend_from_slice(b"\"\xff\xfe@x.io\",1\n");
        bytes.extend_from_slice(b"\"");
        bytes.extend(std::iter::repeat_n(b'z', MAX_LINE_BYTES + 10));
        bytes.extend_from_slice(b"\n@x.io\",1\n");
        bytes.extend_from_slice(b"ok@x.io,2\n");
        let got: Vec<_> = csv_records(&bytes)
            .await
            .into_iter()
            .map(|r| r.map(|r| r.value(Field::Email)))
            .collect();
        assert_eq!(
            got,
            vec![
                Err(Malformed::NotARecord),
                Err(Malformed::NotARecord),
                Err(Malformed::NotARecord),
                Err(Malformed::TooLong),
                Ok(Some("ok@x.io".to_owned())),
            ]
        );
    }

    #[tokio::test]
    async fn a_csv_row_of_exactly_the_limit_is_read_and_one_byte_more_is_not() {
        for (extra, expect_record) in [(0, true), (1, false)] {
            let mut row = b"x@y.io,".to_vec();
            row.extend(std::iter::repeat_n(
                b'7',
                MAX_LINE_BYTES - row.len() + extra,
            ));
            let mut bytes = b"email,phone\r\n".to_vec();
            bytes.extend_from_slice(&row);
            bytes.extend_from_slice(b"\r\n");
            let got = csv_records(&bytes).await;
            assert_eq!(got.len(), 1);
            assert_eq!(
                got[0].is_ok(),
                expect_record,
                "a row of {} bytes",
                row.len()
            );
        }
    }

    #[tokio::test]
    async fn a_csv_without_rows_has_no_records_and_a_huge_header_is_refused() {
        assert!(csv_records(b"").await.is_empty());
        assert!(csv_records(b"email,phone\r\n").await.is_empty());
        let root = Root::new();
        let mut bytes = vec![b'h'; MAX_LINE_BYTES + 1];
        bytes.extend_from_slice(b"\nx\n");
        let url = root.write("segment.csv", &bytes);
        let error = SegmentReader::open(&source(&url, SourceFormat::Csv, None), &root.settings())
            .await
            .err()
            .expect("refused");
        assert!(matches!(error, SourceError::Header(_)), "{error}");
        assert!(!error.retryable());
    }

    #[tokio::test]
    async fn gzip_is_detected_by_its_magic_bytes_unless_the_job_says_none() {
        let root = Root::new();
        let plain = b"{\"email\":\"a@x.io\"}\n{\"email\":\"b@x.io\"}\n";
        // Two gzip members back to back, as `cat a.gz b.gz` makes.
        let mut compressed = gzip(&plain[..19]).await;
        compressed.extend(gzip(&plain[19..]).await);
        assert_eq!(&compressed[..2], &[0x1f, 0x8b]);
        let url = root.write("segment.ndjson.gz", &compressed);
        let want = vec![Ok(Some("a@x.io".to_owned())), Ok(Some("b@x.io".to_owned()))];
        assert_eq!(
            emails(&source(&url, SourceFormat::Ndjson, None), &root.settings()).await,
            want,
            "detected"
        );
        assert_eq!(
            emails(
                &source(&url, SourceFormat::Ndjson, Some(Compression::Gzip)),
                &root.settings()
            )
            .await,
            want,
            "as the job says"
        );
        let raw = emails(
            &source(&url, SourceFormat::Ndjson, Some(Compression::None)),
            &root.settings(),
        )
        .await;
        assert!(
            raw.iter().all(|l| matches!(l, Err(Malformed::NotARecord))),
            "`none` reads the bytes as they are: {raw:?}"
        );

        let url = root.write("plain.ndjson", plain);
        assert_eq!(
            emails(&source(&url, SourceFormat::Ndjson, None), &root.settings()).await,
            want,
            "no magic bytes: read as is"
        );
        let url = root.write("one-byte.ndjson", b"\x1f");
        assert_eq!(
            emails(&source(&url, SourceFormat::Ndjson, None), &root.settings()).await,
            vec![Err(Malformed::NotARecord)],
            "half a magic number is not gzip"
        );
    }

    #[tokio::test]
    async fn a_gzip_source_that_is_not_gzip_is_an_error_not_worth_retrying() {
        let root = Root::new();
        let url = root.write("segment.ndjson.gz", b"{\"email\":\"a@x.io\"}\n");
        let settings = root.settings();
        let gz = source(&url, SourceFormat::Ndjson, Some(Compression::Gzip));
        let mut reader = SegmentReader::open(&gz, &settings).await.unwrap();
        let error = reader.next().await.err().expect("not gzip");
        assert!(matches!(error, SourceError::Read { .. }), "{error}");
        assert!(!error.retryable(), "{error}");
    }

    #[tokio::test]
    async fn file_sources_are_refused_without_a_root_and_outside_it() {
        let root = Root::new();
        let url = root.write("segment.ndjson", b"{\"email\":\"a@x.io\"}\n");
        let ndjson = |url: &str| source(url, SourceFormat::Ndjson, None);
        let refusal = |settings: SourceSettings, url: String| async move {
            SegmentReader::open(&ndjson(&url), &settings)
                .await
                .err()
                .expect("refused")
        };

        let unset = refusal(SourceSettings::default(), url.clone()).await;
        assert!(matches!(unset, SourceError::NoFileRoot), "{unset}");
        assert!(
            unset.to_string().contains("AE_PRODUCER__FILE_ROOT"),
            "{unset}"
        );

        let passwd = refusal(root.settings(), "file:///etc/passwd".into()).await;
        assert!(
            matches!(
                passwd,
                SourceError::OutsideRoot {
                    through_symlink: false,
                    ..
                }
            ),
            "{passwd}"
        );
        assert!(
            passwd.to_string().contains("AE_PRODUCER__FILE_ROOT"),
            "{passwd}"
        );

        // A file outside the root that would read fine, reached through a symlink inside it.
        let outside = Root::new();
        let target = outside.0.join("elsewhere.ndjson");
        std::fs::write(&target, b"{\"email\":\"secret@x.io\"}\n").unwrap();
        std::os::unix::fs::symlink(&target, root.0.join("link.ndjson")).unwrap();
        let link = url::Url::from_file_path(root.0.join("link.ndjson")).unwrap();
        let through = refusal(root.settings(), link.to_string()).await;
        assert!(
            matches!(
                through,
                SourceError::OutsideRoot {
                    through_symlink: true,
                    ..
                }
            ),
            "{through}"
        );
        // A symlinked directory pointing out, too.
        std::os::unix::fs::symlink(&outside.0, root.0.join("dir")).unwrap();
        let via_dir = url::Url::from_file_path(root.0.join("dir/elsewhere.ndjson")).unwrap();
        let through = refusal(root.settings(), via_dir.to_string()).await;
        assert!(
            matches!(through, SourceError::OutsideRoot { .. }),
            "{through}"
        );

        for error in [unset, passwd, through] {
            assert!(!error.retryable(), "{error}");
        }

        // Inside, symlinks are fine; so is a root named through a symlink.
        std::os::unix::fs::symlink(root.0.join("segment.ndjson"), root.0.join("inside.ndjson"))
            .unwrap();
        let inside = url::Url::from_file_path(root.0.join("inside.ndjson")).unwrap();
        assert_eq!(
            emails(&ndjson(inside.as_str()), &root.settings())
                .await
                .len(),
            1
        );
        let alias = outside.0.join("root-alias");
        std::os::unix::fs::symlink(&root.0, &alias).unwrap();
        let settings = SourceSettings {
            file_root: Some(alias.clone()),
            ..SourceSettings::default()
        };
        assert_eq!(emails(&ndjson(&url), &settings).await.len(), 1);
        let via_alias = url::Url::from_file_path(alias.join("segment.ndjson")).unwrap();
        assert_eq!(
            emails(&ndjson(via_alias.as_str()), &settings).await.len(),
            1
        );
    }

    #[tokio::test]
    async fn dot_dot_never_leaves_the_root_and_a_missing_file_is_permanent() {
        let root = Root::new();
        std::fs::create_dir_all(root.0.join("sub")).unwrap();
        let climbing = root.0.join("sub/../../etc/passwd");
        let error = confine(&climbing, &root.0).await.expect_err("refused");
        assert!(
            matches!(
                error,
                SourceError::OutsideRoot {
                    through_symlink: false,
                    ..
                }
            ),
            "{error}"
        );
        let inside = confine(&root.0.join("sub/../x.ndjson"), &root.0)
            .await
            .expect_err("missing");
        assert!(
            matches!(inside, SourceError::Open(_)),
            "`..` that stays inside is resolved: {inside}"
        );
        assert!(!inside.retryable());
        // A URL's `..` (even percent-encoded) is resolved by the URL parser already.
        let url = format!(
            "file://{}/sub/%2e%2e/%2E%2E/%2e%2e/etc/passwd",
            root.0.display()
        );
        let error =
            SegmentReader::open(&source(&url, SourceFormat::Ndjson, None), &root.settings())
                .await
                .err()
                .expect("refused");
        assert!(matches!(error, SourceError::OutsideRoot { .. }), "{error}");
        let relative = SourceSettings {
            file_root: Some("relative/dir".into()),
            ..SourceSettings::default()
        };
        let url = root.write("x.ndjson", b"");
        let error = SegmentReader::open(&source(&url, SourceFormat::Ndjson, None), &relative)
            .await
            .err()
            .expect("refused");
        assert!(matches!(error, SourceError::FileRoot { .. }), "{error}");
    }

    #[test]
    fn a_headers_secret_is_header_lines_and_its_errors_show_no_value() {
        let text = b"# the segments API\r\nAuthorization: Bearer tok:en\r\n\r\n  X-Api-Key :  k3y  \nx-api-key: second\n";
        let headers = parse_headers(text, "segments").unwrap();
        assert_eq!(headers["authorization"], "Bearer tok:en");
        let keys: Vec<_> = headers.get_all("x-api-key").iter().collect();
        assert_eq!(keys, vec!["k3y", "second"]);
        assert!(headers.values().all(HeaderValue::is_sensitive));
        assert!(
            !format!("{headers:?}").contains("k3y"),
            "Debug shows no value"
        );

        for (text, expect) in [
            (&b"Authorization Bearer hunter2"[..], "line 1"),
            (b"X-Ok: fine\nBad Name: hunter2", "line 2"),
            (b"X-Empty:   ", "value of `x-empty`"),
            (b"X-Ctl: hunter2\x01", "value of `x-ctl`"),
            (b"# nothing\n\n", "holds no header"),
            (b"\xff: hunter2", "not UTF-8"),
        ] {
            let error = parse_headers(text, "segments").expect_err(expect);
            assert!(error.contains(expect), "{error}");
            assert!(error.contains("`segments`"), "{error}");
            assert!(!error.contains("hunter2"), "a value in an error: {error}");
        }
    }

    #[tokio::test]
    async fn a_headers_secret_is_looked_up_by_name_in_the_secrets_dir_only() {
        let dir = Root::new();
        std::fs::write(dir.0.join("segments"), "X-Api-Key: hunter2\n").unwrap();
        let headers = headers_secret(Some(&dir.0), "segments").await.unwrap();
        assert_eq!(headers["x-api-key"], "hunter2");
        for (dir, name, expect) in [
            (None, "segments", "AE_PRODUCER__SOURCE_SECRETS_DIR"),
            (
                Some(dir.0.as_path()),
                "other",
                "no headers secret named `other`",
            ),
            (Some(dir.0.as_path()), "../segments", "not a secret's name"),
            (Some(dir.0.as_path()), "..data", "not a secret's name"),
        ] {
            let error = headers_secret(dir, name).await.expect_err(expect);
            assert!(matches!(error, SourceError::Secret(_)));
            assert!(error.to_string().contains(expect), "{error}");
            assert!(!error.retryable());
        }
        let url = "file:///x.ndjson";
        let mut job = source(url, SourceFormat::Ndjson, None);
        job.headers_secret = Some("segments".into());
        let error = SegmentReader::open(&job, &SourceSettings::default())
            .await
            .err()
            .unwrap();
        assert!(
            error
                .to_string()
                .contains("http:// and https:// sources only"),
            "{error}"
        );
    }

    #[test]
    fn which_errors_are_worth_retrying() {
        let io = |kind| io::Error::new(kind, "x");
        let status = |status| SourceError::Status {
            status,
            detail: String::new(),
        };
        let generic =
            |source: Box<dyn std::error::Error + Send + Sync>| object_store::Error::Generic {
                store: "S3",
                source,
            };
        let http = |kind| {
            generic(Box::new(object_store::client::HttpError::new(
                kind,
                io::Error::other("x"),
            )))
        };
        use object_store::client::HttpErrorKind as K;
        let cases: Vec<(&str, SourceError, bool)> = vec![
            ("HTTP 500", status(500), true),
            ("HTTP 503", status(503), true),
            ("HTTP 429", status(429), true),
            ("HTTP 408", status(408), true),
            ("HTTP 400", status(400), false),
            ("HTTP 401", status(401), false),
            ("HTTP 403", status(403), false),
            ("HTTP 404", status(404), false),
            ("HTTP 302 not followed", status(302), false),
            ("scheme", SourceError::Scheme("ftp".into()), false),
            ("url", SourceError::Url("x".into()), false),
            ("no root", SourceError::NoFileRoot, false),
            (
                "outside the root",
                SourceError::OutsideRoot {
                    path: "/etc/passwd".into(),
                    root: "/r".into(),
                    through_symlink: false,
                },
                false,
            ),
            ("secret", SourceError::Secret("x".into()), false),
            (
                "missing file",
                SourceError::Open(io(io::ErrorKind::NotFound)),
                false,
            ),
            (
                "connect refused",
                SourceError::Connect {
                    message: "x".into(),
                    retryable: true,
                },
                true,
            ),
            ("bad header", SourceError::Header("x".into()), false),
            (
                "reset",
                SourceError::Read {
                    error: io(io::ErrorKind::ConnectionReset),
                    remote: true,
                },
                true,
            ),
            (
                "idle timeout",
                SourceError::Read {
                    error: io(io::ErrorKind::TimedOut),
                    remote: true,
                },
                true,
            ),
            (
                "remote body cut short",
                SourceError::Read {
                    error: io(io::ErrorKind::UnexpectedEof),
                    remote: true,
                },
                true,
            ),
            (
                "local gzip cut short",
                SourceError::Read {
                    error: io(io::ErrorKind::UnexpectedEof),
                    remote: false,
                },
                false,
            ),
            (
                "corrupt gzip",
                SourceError::Read {
                    error: io(io::ErrorKind::InvalidData),
                    remote: true,
                },
                false,
            ),
            (
                "S3 object missing",
                SourceError::Read {
                    error: io::Error::other(object_store::Error::NotFound {
                        path: "k".into(),
                        source: "x".into(),
                    }),
                    remote: true,
                },
                false,
            ),
            (
                "S3 timeout",
                SourceError::Read {
                    error: io::Error::other(http(K::Timeout)),
                    remote: true,
                },
                true,
            ),
            (
                "S3 connection",
                SourceError::Read {
                    error: io::Error::other(http(K::Connect)),
                    remote: true,
                },
                true,
            ),
            (
                "S3 undecodable",
                SourceError::Read {
                    error: io::Error::other(http(K::Decode)),
                    remote: true,
                },
                false,
            ),
            (
                "S3 503",
                SourceError::Read {
                    error: io::Error::other(generic(
                        "Server returned non-2xx status code: 503 Service Unavailable: ".into(),
                    )),
                    remote: true,
                },
                true,
            ),
            (
                "S3 400",
                SourceError::Read {
                    error: io::Error::other(generic(
                        "Server returned non-2xx status code: 400 Bad Request: ".into(),
                    )),
                    remote: true,
                },
                false,
            ),
        ];
        for (name, error, retryable) in cases {
            assert_eq!(error.retryable(), retryable, "{name}: {error}");
        }
        let denied = object_store::Error::PermissionDenied {
            path: "k".into(),
            source: "x".into(),
        };
        assert!(!store_retryable(&denied));
    }

    /// A segments server: `/seg.csv` (CSV, gzipped, requires `X-Api-Key: hunter2`, with an ETag),
    /// `/encoded` (NDJSON sent with `Content-Encoding: gzip`), `/busy` (503), `/away` (a redirect
    /// to `elsewhere`). Counts the requests that carried the key.
    async fn segments_server(
        elsewhere: Option<String>,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let keyed = std::sync::Arc::new(AtomicUsize::new(0));
        let seen = keyed.clone();
        let csv = gzip(b"email,phone\r\na@x.io,1\r\nb@x.io,2\r\n").await;
        let ndjson = gzip(b"{\"email\":\"c@x.io\"}\n").await;
        let app = axum::Router::new()
            .route(
                "/seg.csv",
                get(move |headers: Headers| {
                    let csv = csv.clone();
                    async move {
                        if headers.get("x-api-key").is_none_or(|k| k != "hunter2") {
                            return (StatusCode::UNAUTHORIZED, Headers::new(), Vec::new());
                        }
                        let mut out = Headers::new();
                        out.insert("etag", "\"v1\"".parse().unwrap());
                        (StatusCode::OK, out, csv)
                    }
                }),
            )
            .route(
                "/encoded",
                get(move || {
                    let ndjson = ndjson.clone();
                    async move { ([("content-encoding", "gzip")], ndjson) }
                }),
            )
            .route("/busy", get(|| async { StatusCode::SERVICE_UNAVAILABLE }))
            .route(
                "/brotli",
                get(|| async { ([("content-encoding", "br")], "\u{1b}\u{5}") }),
            )
            .route(
                "/away",
                get(move || {
                    let to = elsewhere.clone().unwrap_or_default();
                    async move { (StatusCode::FOUND, [("location", to)]) }
                }),
            )
            .fallback(get(move |headers: Headers| async move {
                if headers.contains_key("x-api-key") {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
                "{\"email\":\"elsewhere@x.io\"}\n"
            }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), keyed)
    }

    #[tokio::test]
    async fn http_sources_send_the_secret_headers_and_decode_gzip() {
        use std::sync::atomic::Ordering;
        let secrets = Root::new();
        std::fs::write(secrets.0.join("segments"), "X-Api-Key: hunter2\n").unwrap();
        let (other, keyed_elsewhere) = segments_server(None).await;
        let (base, _) = segments_server(Some(format!("{other}/stolen"))).await;
        let settings = SourceSettings {
            secrets_dir: Some(secrets.0.clone()),
            ..SourceSettings::default()
        };
        let with_key = |path: &str, format| Source {
            headers_secret: Some("segments".into()),
            ..source(&format!("{base}{path}"), format, None)
        };

        let mut reader = SegmentReader::open(&with_key("/seg.csv", SourceFormat::Csv), &settings)
            .await
            .unwrap();
        assert!(
            reader.identity().contains("etag=\"v1\""),
            "{}",
            reader.identity()
        );
        let mut got = Vec::new();
        while let Some(Line::Record(r)) = reader.next().await.unwrap() {
            got.push(r.value(Field::Email).unwrap());
        }
        assert_eq!(got, vec!["a@x.io", "b@x.io"]);

        let without = source(&format!("{base}/seg.csv"), SourceFormat::Csv, None);
        let error = SegmentReader::open(&without, &settings)
            .await
            .err()
            .expect("401");
        assert!(
            matches!(error, SourceError::Status { status: 401, .. }),
            "{error}"
        );
        assert!(!error.retryable());

        let encoded = source(
            &format!("{base}/encoded"),
            SourceFormat::Ndjson,
            Some(Compression::None),
        );
        assert_eq!(
            emails(&encoded, &settings).await,
            vec![Ok(Some("c@x.io".to_owned()))]
        );

        let brotli = source(&format!("{base}/brotli"), SourceFormat::Ndjson, None);
        let encoding = SegmentReader::open(&brotli, &settings)
            .await
            .err()
            .expect("refused");
        assert!(
            encoding.to_string().contains("Content-Encoding: br"),
            "{encoding}"
        );
        assert!(!encoding.retryable());

        let busy = SegmentReader::open(
            &source(&format!("{base}/busy"), SourceFormat::Ndjson, None),
            &settings,
        )
        .await
        .err()
        .expect("503");
        assert!(busy.retryable(), "{busy}");

        // The secret's headers never go to another origin: the redirect is not followed.
        let away = SegmentReader::open(&with_key("/away", SourceFormat::Ndjson), &settings)
            .await
            .err()
            .expect("not followed");
        assert!(
            matches!(away, SourceError::Status { status: 302, .. }),
            "{away}"
        );
        assert_eq!(keyed_elsewhere.load(Ordering::SeqCst), 0);
        // Without a secret, a redirect is followed.
        let followed = source(&format!("{base}/away"), SourceFormat::Ndjson, None);
        assert_eq!(
            emails(&followed, &settings).await,
            vec![Ok(Some("elsewhere@x.io".to_owned()))]
        );

        for error in [error, busy, away] {
            assert!(
                !format!("{error} {error:?}").contains("hunter2"),
                "{error:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_unreachable_server_a_body_cut_short_and_a_stalled_body_are_worth_retrying() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let settings = SourceSettings {
            timeout: Duration::from_millis(300),
            ..SourceSettings::default()
        };
        let refused = SegmentReader::open(
            &source(&format!("http://{addr}/x"), SourceFormat::Ndjson, None),
            &settings,
        )
        .await
        .err()
        .expect("refused");
        assert!(matches!(refused, SourceError::Connect { .. }), "{refused}");
        assert!(refused.retryable(), "{refused}");

        // A server that promises 1000 bytes, sends one line, then closes (`cut`) or goes silent.
        for cut in [true, false] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = vec![0u8; 4096];
                let _ = stream.read(&mut request).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n{\"email\":\"a@x.io\"}\n",
                    )
                    .await;
                if !cut {
                    let _ = stopped.await;
                }
            });
            let url = format!("http://{addr}/seg.ndjson");
            let mut reader = SegmentReader::open(
                &source(&url, SourceFormat::Ndjson, Some(Compression::None)),
                &settings,
            )
            .await
            .unwrap();
            assert!(matches!(reader.next().await, Ok(Some(Line::Record(_)))));
            let error = reader.next().await.err().expect("the body ends early");
            assert!(error.retryable(), "cut {cut}: {error}");
            drop(stop);
        }
    }
}
