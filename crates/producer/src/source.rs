//! Reads a segment export line by line, so memory does not grow with the segment. Knows the
//! record shape (`external_id`, `email`, `phone`, `idfa`/`madid`, consent attributes) and
//! nothing of sharding. Never logs a record.

use audience_export_core::contract::SourceFormat;
use audience_export_core::Field;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};

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

/// A segment being read.
pub struct SegmentReader {
    lines: Lines<BufReader<tokio::fs::File>>,
}

/// One line's worth: a record, or a line that is not one.
pub enum Line {
    Record(SegmentRecord),
    Malformed,
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
        Ok(SegmentReader {
            lines: BufReader::with_capacity(256 * 1024, file).lines(),
        })
    }

    /// The next non-blank line, or None at the end.
    pub async fn next(&mut self) -> Result<Option<Line>, SourceError> {
        while let Some(line) = self.lines.next_line().await? {
            if line.trim().is_empty() {
                continue;
            }
            return Ok(Some(match serde_json::from_str::<SegmentRecord>(&line) {
                Ok(record) => Line::Record(record),
                Err(_) => Line::Malformed,
            }));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
