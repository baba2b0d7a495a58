//! Reads a segment export line by line, so memory does not grow with the segment. Knows the
//! record shape (`external_id`, `email`, `phone`, `idfa`/`madid`, consent attributes) and
//! nothing of sharding. Never logs a record.

use audience_export_core::contract::SourceFormat;
use audience_export_core::Field;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Why a source cannot be read. A missing or unreadable file is permanent for this job.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source URL `{0}` is not supported (use file://)")]
    Scheme(String),
    #[error("source URL is invalid: {0}")]
    Url(String),
    #[error("the segment file could not be read: {0}")]
    Io(#[from] std::io::Error),
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
}

/// The longest line read as a record. A member is a few hundred bytes; a line past this is not
/// one (a binary file, a missing newline): it is counted malformed and skipped without being
/// held in memory.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// A segment being read.
pub struct SegmentReader {
    reader: BufReader<tokio::fs::File>,
    line: Vec<u8>,
    /// What identifies this very content (`SourceIdentity`).
    identity: String,
}

/// Why a line is not a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Not a JSON object of the record's shape (invalid UTF-8 included).
    NotARecord,
    /// Longer than `MAX_LINE_BYTES`.
    TooLong,
}

/// One line's worth: a record, or a line that is not one.
pub enum Line {
    Record(SegmentRecord),
    Malformed(Malformed),
}

impl SegmentReader {
    pub async fn open(url: &str, format: SourceFormat) -> Result<SegmentReader, SourceError> {
        debug_assert_eq!(
            format,
            SourceFormat::Ndjson,
            "the job validation admits ndjson only"
        );
        let parsed = url::Url::parse(url).map_err(|e| SourceError::Url(e.to_string()))?;
        if parsed.scheme() != "file" {
            return Err(SourceError::Scheme(parsed.scheme().to_owned()));
        }
        let path = parsed
            .to_file_path()
            .map_err(|()| SourceError::Url(format!("`{url}` names no local file")))?;
        let file = tokio::fs::File::open(path).await?;
        let meta = file.metadata().await?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok(SegmentReader {
            reader: BufReader::with_capacity(256 * 1024, file),
            line: Vec::with_capacity(1024),
            identity: format!("file:{}:{modified}", meta.len()),
        })
    }

    /// What identifies the content being read (a file's size and modification time): a resumed
    /// plan compares it with the first plan's, so a segment replaced meanwhile is noticed.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The next non-blank line, or None at the end. Bytes, not text: a line that is not UTF-8
    /// or is too long is a malformed line, counted, never an error that stops the export.
    pub async fn next(&mut self) -> Result<Option<Line>, SourceError> {
        loop {
            self.line.clear();
            let (read, too_long) = read_line(&mut self.reader, &mut self.line).await?;
            if read == 0 {
                return Ok(None);
            }
            if too_long {
                return Ok(Some(Line::Malformed(Malformed::TooLong)));
            }
            if self.line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Ok(Some(
                match serde_json::from_slice::<SegmentRecord>(&self.line) {
                    Ok(record) => Line::Record(record),
                    Err(_) => Line::Malformed(Malformed::NotARecord),
                },
            ));
        }
    }
}

/// Reads one line (without its newline) into `line`, keeping at most `MAX_LINE_BYTES`: returns
/// the bytes consumed (0 at the end) and whether the line was longer than that (its rest is
/// consumed and dropped).
async fn read_line(
    reader: &mut BufReader<tokio::fs::File>,
    line: &mut Vec<u8>,
) -> std::io::Result<(usize, bool)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines_of(bytes: &[u8]) -> Vec<Result<Option<String>, Malformed>> {
        let path = std::env::temp_dir().join(format!("ae-source-{}.ndjson", rand::random::<u64>()));
        std::fs::write(&path, bytes).unwrap();
        let url = url::Url::from_file_path(&path).unwrap().to_string();
        let mut reader = SegmentReader::open(&url, SourceFormat::Ndjson)
            .await
            .unwrap();
        let mut out = Vec::new();
        while let Some(line) = reader.next().await.unwrap() {
            out.push(match line {
                Line::Record(r) => Ok(r.value(Field::Email)),
                Line::Malformed(m) => Err(m),
            });
        }
        std::fs::remove_file(&path).unwrap();
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
        let blank: SegmentRecord = serde_json::from_str(r#"{"email":"  ","phone":null}"#).unwrap();
        assert_eq!(blank.value(Field::Email), None);
        assert_eq!(blank.value(Field::Phone), None);
    }
}
