//! The notification emails: the report a marketer reads when an export ends, and the notices
//! whoever connected a workspace reads when Meta refuses its connection or its token is about to
//! expire. Each is an `Email` (subject, text, HTML) that `Mailer` sends as
//! `multipart/alternative`: the plain-text part first, the HTML part last, so a client shows the
//! richest part it can and a text-only client shows the text. The HTML is hand-written for mail
//! clients: layout tables with inline styles only, one data table per audience, no images,
//! scripts, stylesheets or any other resource to fetch, readable at 600 px.
//!
//! Holds no identifier and no token; only counts, names and ids. Never puts a value into the HTML
//! without `escape`: segment names, audience names and Meta's messages come from outside.

use audience_export_core::contract::{
    AdAccountId, AudienceReport, ExportStatus, FinishedReport, LookalikeReport, WorkspaceId,
};
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::AsyncSmtpTransport;
use lettre::{AsyncTransport, Message, Tokio1Executor};
use std::fmt::Write;

/// Why an email was not sent. SMTP failures are retryable; a bad address is not.
#[derive(Debug, thiserror::Error)]
pub enum EmailError {
    #[error("no valid recipient")]
    NoRecipient,
    #[error("the email could not be built: {0}")]
    Build(#[from] lettre::error::Error),
    #[error("the SMTP server refused or could not be reached: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error("the sender address is invalid: {0}")]
    From(#[from] lettre::address::AddressError),
}

impl EmailError {
    /// An SMTP failure is worth retrying unless the server answered with a permanent (5xx)
    /// refusal: a relay that is down comes back, a mailbox that does not exist does not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, EmailError::Smtp(e) if !e.is_permanent())
    }
}

/// One email, ready to send: what every builder here returns and `Notifier::send` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    pub subject: String,
    /// The `text/plain` part.
    pub text: String,
    /// The `text/html` part: a whole document, every interpolated value escaped.
    pub html: String,
}

#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    /// A mailer for the relay at `host:port`; an SMTP exchange taking longer than `timeout`
    /// fails (and is retried later), always inside the finalization lease.
    pub fn new(
        host: &str,
        port: u16,
        from: &str,
        timeout: std::time::Duration,
    ) -> Result<Mailer, EmailError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .timeout(Some(timeout))
            .build();
        Ok(Mailer {
            transport,
            from: from.parse()?,
        })
    }

    /// The message `send` would send: `multipart/alternative`, text then HTML, to the
    /// recipients that parse as addresses (the others are skipped and logged).
    pub fn message(&self, recipients: &[String], email: &Email) -> Result<Message, EmailError> {
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(email.subject.clone());
        let mut any = false;
        for r in recipients {
            match r.parse::<Mailbox>() {
                Ok(mailbox) => {
                    builder = builder.to(mailbox);
                    any = true;
                }
                Err(_) => tracing::warn!(
                    message = "Skipping a notification recipient that is not an address."
                ),
            }
        }
        if !any {
            return Err(EmailError::NoRecipient);
        }
        // lettre picks each part's transfer encoding: 7bit, or quoted-printable for long lines
        // (the links) and non-ASCII text. The HTML is ASCII (`escape` writes the rest as
        // character references), so it is never base64.
        let alternative = MultiPart::alternative()
            .singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_PLAIN)
                    .body(email.text.clone()),
            )
            .singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_HTML)
                    .body(email.html.clone()),
            );
        Ok(builder.multipart(alternative)?)
    }

    /// Sends `email` to the recipients that parse as addresses; skips the others.
    pub async fn send(&self, recipients: &[String], email: &Email) -> Result<(), EmailError> {
        let message = self.message(recipients, email)?;
        self.transport.send(message).await?;
        Ok(())
    }
}

/// What a token-error subcode means, in words a marketer can act on.
pub fn token_subcode_meaning(subcode: Option<i64>) -> &'static str {
    match subcode {
        Some(458) => "the person who connected removed the app from their Facebook account",
        Some(459) => "Facebook asks the person who connected to log in to facebook.com and pass a security checkpoint",
        Some(460) => "the person who connected changed their Facebook password, or Facebook reset their session",
        Some(463) => "the token expired",
        Some(464) => "the person who connected has an unconfirmed Facebook account",
        Some(467) => "the token is no longer valid (logged out, or revoked)",
        Some(492) => "the session is invalid (the person may have lost their role in the business)",
        _ => "Meta no longer accepts the token",
    }
}

// ---------------------------------------------------------------------------------------------
// Notices: a subject, a few paragraphs and the fix. One more kind is one function building one.

/// A notice to a person about a workspace's connection, an ad account, anything that needs them
/// to act: paragraphs of what happened and what follows, then what to do. The text part has one
/// sentence per line and a blank line between paragraphs; the HTML puts the headline in a banner
/// of the tone's colour and sets the fix apart. Every string is plain text (escaped here).
pub struct Notice {
    pub subject: String,
    /// The colour of the HTML's banner.
    pub tone: Tone,
    /// The HTML's banner: what happened, in a few words.
    pub headline: String,
    /// What happened and what follows from it: paragraphs of sentences.
    pub paragraphs: Vec<Vec<String>>,
    /// What to do, as sentences.
    pub fix: Vec<String>,
}

impl Notice {
    pub fn email(self) -> Email {
        let mut text = String::new();
        let blocks = self.paragraphs.iter().chain([&self.fix]);
        for (i, paragraph) in blocks.filter(|p| !p.is_empty()).enumerate() {
            if i > 0 {
                text.push('\n');
            }
            for sentence in paragraph {
                text.push_str(sentence);
                text.push('\n');
            }
        }
        let mut content = String::new();
        for paragraph in &self.paragraphs {
            let _ = write!(
                content,
                r#"<p style="margin:0 0 14px 0;">{}</p>"#,
                escape(&paragraph.join(" "))
            );
        }
        let _ = write!(
            content,
            r#"<table role="presentation" width="100%" cellpadding="0" cellspacing="0" border="0" style="width:100%;margin:6px 0 0 0;"><tr><td style="padding:12px 16px;background-color:#eef2ff;border-left:4px solid #4338ca;"><p style="margin:0 0 6px 0;font-weight:bold;color:#312e81;">What to do</p><p style="margin:0;">{}</p></td></tr></table>"#,
            escape(&self.fix.join(" "))
        );
        let html = page(&self.subject, self.tone, &self.headline, &content, None);
        Email {
            subject: self.subject,
            text,
            html,
        }
    }
}

/// The email to whoever connected a workspace when Meta refuses its connection.
pub fn connection_invalid(
    workspace: &WorkspaceId,
    code: i64,
    subcode: Option<i64>,
    message: &str,
    at: &str,
) -> Email {
    Notice {
        subject: format!("Facebook connection of workspace {workspace} must be reconnected"),
        tone: Tone::Bad,
        headline: "Facebook connection refused by Meta".to_owned(),
        paragraphs: vec![
            vec![
                format!(
                    "Meta refused the Facebook connection of workspace {workspace} at {at}: {}.",
                    token_subcode_meaning(subcode)
                ),
                format!(
                    "Meta said: {message} (code {code}{}).",
                    subcode
                        .map(|s| format!(", subcode {s}"))
                        .unwrap_or_default()
                ),
            ],
            vec![
                "Exports running on this connection have stopped; each export's requester gets its own report.".to_owned(),
                "New exports to Facebook from this workspace are refused until it is reconnected.".to_owned(),
            ],
        ],
        fix: vec![
            "To reconnect: open the workspace's Facebook integration and connect again, or set a new Business Manager system user token.".to_owned(),
            "Exports refused meanwhile do not restart by themselves: export those segments again once reconnected.".to_owned(),
        ],
    }
    .email()
}

/// The email to whoever connected a workspace when its user token is about to expire.
pub fn expiry_warning(workspace: &WorkspaceId, expires_on: &str, days_left: i64) -> Email {
    let (tone, headline, when) = if days_left > 0 {
        (
            Tone::Warning,
            format!("Facebook connection expires in {days_left} day(s)"),
            format!(
                "The Facebook connection of workspace {workspace} expires on {expires_on}, in {days_left} day(s)."
            ),
        )
    } else {
        (
            Tone::Bad,
            "Facebook connection expired".to_owned(),
            format!("The Facebook connection of workspace {workspace} expired on {expires_on}."),
        )
    };
    Notice {
        subject: format!("Facebook connection of workspace {workspace} expires on {expires_on}"),
        tone,
        headline,
        paragraphs: vec![vec![
            when,
            "After that, exports to Facebook from this workspace fail until it is reconnected."
                .to_owned(),
        ]],
        fix: vec![
            "To renew it: open the workspace's Facebook integration and connect again. A Business Manager system user token does not expire this way; setting one avoids renewals.".to_owned(),
        ],
    }
    .email()
}

// ---------------------------------------------------------------------------------------------
// The export report.

/// The report of a finished export (any status, dry run or not), to its requesters.
pub fn report(r: &FinishedReport) -> Email {
    let subject = report_subject(r);
    let html = report_html(r, &subject);
    Email {
        text: report_text(r),
        html,
        subject,
    }
}

fn report_subject(report: &FinishedReport) -> String {
    let what = match report.status {
        ExportStatus::Succeeded => "is complete",
        ExportStatus::PartiallyFailed => "is complete, with errors",
        ExportStatus::Failed => "failed",
        ExportStatus::Rejected => "could not start",
        ExportStatus::Cancelled => "was cancelled",
    };
    let what = if report.dry_run {
        match report.status {
            ExportStatus::Succeeded => "dry run is complete".to_owned(),
            _ => format!("dry run {what}"),
        }
    } else {
        what.to_owned()
    };
    let name = if report.segment_name.is_empty() {
        report.export_id.as_str()
    } else {
        &report.segment_name
    };
    format!("Facebook audience export of \"{name}\" {what}")
}

const DRY_RUN_NOTE: &str = "This was a dry run: no audience was created and nothing was sent to Meta. \"Would upload\" is what a real export of this segment would send.";
const CANCELLED_NOTE: &str = "Nothing more was sent after the cancellation; what was uploaded before it stays in the audiences below (delete them in Ads Manager if they must go).";
const NOT_CONFIRMED_NOTE: &str =
    "not created, or Meta never confirmed its id: look for this name in Ads Manager";
const MATCHING_NOTE: &str =
    "Meta matches the uploaded people within about 24 hours; it never tells who matched.";

/// Where the marketer opens an audience (the text part and the HTML's link alike).
fn ads_manager_url(account: &AdAccountId, audience_id: &str) -> String {
    format!("https://business.facebook.com/adsmanager/audiences?act={account}&ids={audience_id}")
}

/// Meta's approximate size, "about 105,000 – 118,000 people"; `None` when Meta gave neither
/// bound.
fn approximate_size(a: &AudienceReport) -> Option<String> {
    let people = match (
        a.approximate_count_lower_bound,
        a.approximate_count_upper_bound,
    ) {
        (Some(lo), Some(hi)) if lo == hi => format!("about {}", thousands(lo)),
        (Some(lo), Some(hi)) => format!("about {} \u{2013} {}", thousands(lo), thousands(hi)),
        (Some(lo), None) => format!("at least {}", thousands(lo)),
        (None, Some(hi)) => format!("at most {}", thousands(hi)),
        (None, None) => return None,
    };
    Some(format!("{people} people"))
}

/// The lookalike's line: its name and id, or why Meta did not make it.
fn lookalike_summary(l: &LookalikeReport) -> String {
    match (&l.audience_id, &l.error) {
        (Some(id), _) => format!("\"{}\" (id {id})", l.name),
        (None, Some(error)) => format!("\"{}\" not made: {error}", l.name),
        (None, None) => format!("\"{}\" not made", l.name),
    }
}

fn report_text(r: &FinishedReport) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let account = r.ad_account_id.as_ref().map_or_else(
        || "an unknown ad account".to_owned(),
        |a| format!("ad account {}", a.act()),
    );
    let _ = writeln!(
        out,
        "Export {} of segment \"{}\" to {account}: {}.",
        r.export_id, r.segment_name, r.status
    );
    if let Some(reason) = &r.reason {
        let _ = writeln!(out, "Reason: {reason}");
    }
    if r.dry_run {
        let _ = writeln!(out, "{DRY_RUN_NOTE}");
    }
    if r.status == ExportStatus::Cancelled {
        let _ = writeln!(out, "{CANCELLED_NOTE}");
    }
    let _ = writeln!(out, "\nMembers read: {}", r.members_read);
    if r.malformed_records > 0 {
        let _ = writeln!(out, "Lines that were not a record: {}", r.malformed_records);
    }
    let excluded: u64 = r.excluded.values().sum();
    if !r.excluded.is_empty() {
        let _ = writeln!(out, "Left out by consent: {excluded}");
        for (attribute, n) in &r.excluded {
            let _ = writeln!(out, "  {attribute}: {n}");
        }
    }
    for a in &r.audiences {
        let label = a.field.map(|f| f.label()).unwrap_or("Audience");
        if r.dry_run {
            let _ = writeln!(out, "\n{label} audience (dry run: not created)");
        } else if a.audience_id.is_empty() {
            let _ = writeln!(
                out,
                "\n{label} audience \"{}\" ({NOT_CONFIRMED_NOTE})",
                a.name
            );
        } else {
            let _ = writeln!(
                out,
                "\n{label} audience \"{}\" (id {})",
                a.name, a.audience_id
            );
        }
        if let (false, Some(account)) = (a.audience_id.is_empty(), &r.ad_account_id) {
            let _ = writeln!(out, "  Open: {}", ads_manager_url(account, &a.audience_id));
        }
        let _ = writeln!(out, "  Members with a value: {}", a.with_value);
        let _ = writeln!(out, "  Members without one: {}", a.missing);
        let _ = writeln!(out, "  Invalid, not sent: {}", a.invalid_total());
        for (reason, n) in &a.invalid {
            let _ = writeln!(out, "    {reason}: {n}");
        }
        if a.prehashed > 0 {
            let _ = writeln!(out, "  Already hashed, passed through: {}", a.prehashed);
        }
        let _ = writeln!(out, "  Duplicates, sent once: {}", a.duplicates);
        if r.dry_run {
            let _ = writeln!(out, "  Would upload: {}", a.uploaded);
        } else {
            let _ = writeln!(out, "  Uploaded: {}", a.uploaded);
            let _ = writeln!(
                out,
                "  Meta received: {}, of which Meta found invalid: {}",
                a.meta_received, a.meta_invalid
            );
            for (reason, n) in &a.meta_invalid_reasons {
                let _ = writeln!(out, "    {reason}: {n}");
            }
        }
        if let Some(size) = approximate_size(a) {
            let _ = writeln!(out, "  Approximate size at Meta: {size}");
        }
        if let Some(lookalike) = &a.lookalike {
            let _ = writeln!(out, "  Lookalike audience {}", lookalike_summary(lookalike));
        }
        if a.shards_failed > 0 {
            let _ = writeln!(
                out,
                "  Batches failed: {} of {} ({})",
                a.shards_failed,
                a.shards,
                a.last_error.as_deref().unwrap_or("no message")
            );
        }
    }
    let _ = writeln!(out, "\n{MATCHING_NOTE}");
    out
}

// ---------------------------------------------------------------------------------------------
// HTML. Mail clients ignore or strip much of CSS: layout is tables (`role="presentation"`, so
// screen readers skip them) with inline styles and the old `width`/`align`/`cellpadding`
// attributes Outlook still reads; no <style> block, web font, image or script.

/// The banner's colour: what kind of news this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    /// Green: done as asked.
    Good,
    /// Amber: done, with something to look at; or something to do soon.
    Warning,
    /// Red: failed, refused, stopped.
    Bad,
    /// Grey: cancelled, or for information.
    Neutral,
}

impl Tone {
    fn of(status: ExportStatus) -> Tone {
        match status {
            ExportStatus::Succeeded => Tone::Good,
            ExportStatus::PartiallyFailed => Tone::Warning,
            ExportStatus::Failed | ExportStatus::Rejected => Tone::Bad,
            ExportStatus::Cancelled => Tone::Neutral,
        }
    }

    /// Dark enough for white text on it (contrast above 4.5:1).
    fn colour(self) -> &'static str {
        match self {
            Tone::Good => "#15803d",
            Tone::Warning => "#b45309",
            Tone::Bad => "#b91c1c",
            Tone::Neutral => "#4b5563",
        }
    }

    /// A light background for notes in this tone.
    fn tint(self) -> &'static str {
        match self {
            Tone::Good => "#f0fdf4",
            Tone::Warning => "#fffbeb",
            Tone::Bad => "#fef2f2",
            Tone::Neutral => "#f3f4f6",
        }
    }
}

/// `s` made safe for HTML text and attribute values: the five special characters as entities,
/// and every non-ASCII character as a character reference, so the part stays ASCII whatever the
/// segment is called.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_ascii() => out.push(c),
            c => {
                let _ = write!(out, "&#x{:x};", u32::from(c));
            }
        }
    }
    out
}

/// `n` with thousands separators: 1234567 → "1,234,567".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

const FONT: &str = "font-family:Arial,Helvetica,sans-serif;";
const TEXT_COLOUR: &str = "#1f2937";
const MUTED: &str = "#6b7280";
const RULE: &str = "#e5e7eb";

/// The whole document: a grey backdrop, a white card at most 600 px wide with the banner in
/// `tone`'s colour, `content` (HTML), and the footer line.
fn page(title: &str, tone: Tone, headline: &str, content: &str, footer: Option<&str>) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        concat!(
            "<!DOCTYPE html>\n",
            r#"<html lang="en"><head><meta charset="utf-8">"#,
            r#"<meta name="viewport" content="width=device-width, initial-scale=1">"#,
            r#"<meta name="color-scheme" content="light"><meta name="supported-color-schemes" content="light">"#,
            "<title>{title}</title></head>\n",
            r#"<body style="margin:0;padding:0;background-color:#f3f4f6;">"#,
            "\n",
            r#"<table role="presentation" width="100%" cellpadding="0" cellspacing="0" border="0" style="width:100%;background-color:#f3f4f6;">"#,
            r#"<tr><td align="center" style="padding:24px 12px;">"#,
            "\n",
            r#"<table role="presentation" width="600" cellpadding="0" cellspacing="0" border="0" style="width:100%;max-width:600px;background-color:#ffffff;border:1px solid {rule};{font}font-size:14px;line-height:20px;color:{text};">"#,
            "\n",
            r#"<tr><td style="padding:16px 24px;background-color:{colour};color:#ffffff;{font}font-size:18px;line-height:24px;font-weight:bold;">{headline}</td></tr>"#,
            "\n",
            r#"<tr><td style="padding:20px 24px;">"#,
            "\n",
        ),
        title = escape(title),
        rule = RULE,
        font = FONT,
        text = TEXT_COLOUR,
        colour = tone.colour(),
        headline = escape(headline),
    );
    out.push_str(content);
    out.push_str("\n</td></tr>\n");
    if let Some(footer) = footer {
        let _ = write!(
            out,
            r#"<tr><td style="padding:14px 24px 18px 24px;border-top:1px solid {RULE};color:{MUTED};font-size:12px;line-height:18px;">{}</td></tr>"#,
            escape(footer)
        );
        out.push('\n');
    }
    out.push_str("</table>\n</td></tr></table>\n</body></html>\n");
    out
}

/// A note set apart from the text around it, with a bar in `tone`'s colour.
fn note(out: &mut String, tone: Tone, html: &str) {
    let _ = write!(
        out,
        r#"<table role="presentation" width="100%" cellpadding="0" cellspacing="0" border="0" style="width:100%;margin:0 0 14px 0;"><tr><td style="padding:10px 14px;background-color:{};border-left:4px solid {};">{html}</td></tr></table>"#,
        tone.tint(),
        tone.colour(),
    );
    out.push('\n');
}

fn heading(out: &mut String, text_html: &str) {
    let _ = write!(
        out,
        r#"<h2 style="margin:22px 0 8px 0;{FONT}font-size:16px;line-height:22px;color:{TEXT_COLOUR};">{text_html}</h2>"#
    );
    out.push('\n');
}

/// One row of a data table.
struct Row {
    label: String,
    /// HTML.
    value: String,
    /// A breakdown row (a reason under its total): indented and smaller.
    detail: bool,
    /// Drawn in the failure colour.
    alarm: bool,
    /// A number, kept on one line; words (a size, a lookalike's error) wrap.
    number: bool,
}

impl Row {
    fn count(label: &str, n: u64) -> Row {
        Row {
            number: true,
            ..Row::html(label, thousands(n))
        }
    }
    fn text(label: &str, value: &str) -> Row {
        Row::html(label, escape(value))
    }
    fn html(label: &str, value: String) -> Row {
        Row {
            label: label.to_owned(),
            value,
            detail: false,
            alarm: false,
            number: false,
        }
    }
    fn detail(label: &str, n: u64) -> Row {
        Row {
            detail: true,
            ..Row::count(label, n)
        }
    }
    fn alarm(self) -> Row {
        Row {
            alarm: true,
            ..self
        }
    }
}

/// A real data table (header cells scoped to rows, so a screen reader reads each count with its
/// label): labels left, values right.
fn data_table(out: &mut String, caption: &str, rows: &[Row]) {
    let _ = write!(
        out,
        r#"<table width="100%" cellpadding="0" cellspacing="0" border="0" style="width:100%;border-collapse:collapse;margin:0 0 12px 0;{FONT}font-size:14px;line-height:20px;"><caption style="text-align:left;padding:0 0 6px 0;color:{MUTED};font-size:12px;line-height:16px;text-transform:uppercase;letter-spacing:0.5px;">{}</caption>"#,
        escape(caption)
    );
    for row in rows {
        let colour = if row.alarm {
            Tone::Bad.colour()
        } else if row.detail {
            MUTED
        } else {
            TEXT_COLOUR
        };
        let (indent, size) = if row.detail {
            ("24px", "13px")
        } else {
            ("8px", "14px")
        };
        let _ = write!(
            out,
            concat!(
                r#"<tr><th scope="row" align="left" valign="top" width="50%" style="width:50%;padding:6px 8px 6px {indent};border-bottom:1px solid {rule};text-align:left;vertical-align:top;font-weight:normal;font-size:{size};color:{colour};word-wrap:break-word;">{label}</th>"#,
                r#"<td align="right" valign="top" style="padding:6px 8px;border-bottom:1px solid {rule};text-align:right;vertical-align:top;{wrap}font-size:{size};color:{colour};">{value}</td></tr>"#,
            ),
            indent = indent,
            wrap = if row.number {
                "white-space:nowrap;"
            } else {
                "word-wrap:break-word;"
            },
            rule = RULE,
            size = size,
            colour = colour,
            label = escape(&row.label),
            value = row.value,
        );
    }
    out.push_str("</table>\n");
}

/// A link styled as a button (a bordered cell: clients that drop padding on links keep it).
fn button(out: &mut String, href: &str, label: &str) {
    let _ = write!(
        out,
        r#"<table role="presentation" cellpadding="0" cellspacing="0" border="0" style="margin:4px 0 12px 0;"><tr><td style="background-color:#1d4ed8;border-radius:4px;"><a href="{}" style="display:inline-block;padding:8px 14px;{FONT}font-size:14px;line-height:18px;color:#ffffff;text-decoration:none;font-weight:bold;">{}</a></td></tr></table>"#,
        escape(href),
        escape(label)
    );
    out.push('\n');
}

fn report_headline(r: &FinishedReport) -> &'static str {
    match (r.dry_run, r.status) {
        (false, ExportStatus::Succeeded) => "Export complete",
        (false, ExportStatus::PartiallyFailed) => "Export complete, with errors",
        (false, ExportStatus::Failed) => "Export failed",
        (false, ExportStatus::Rejected) => "Export could not start",
        (false, ExportStatus::Cancelled) => "Export cancelled",
        (true, ExportStatus::Succeeded) => "Dry run complete",
        (true, ExportStatus::PartiallyFailed) => "Dry run complete, with errors",
        (true, ExportStatus::Failed) => "Dry run failed",
        (true, ExportStatus::Rejected) => "Dry run could not start",
        (true, ExportStatus::Cancelled) => "Dry run cancelled",
    }
}

fn report_html(r: &FinishedReport, subject: &str) -> String {
    let tone = Tone::of(r.status);
    let mut out = String::new();
    let name = if r.segment_name.is_empty() {
        r.export_id.as_str()
    } else {
        &r.segment_name
    };
    let _ = write!(
        out,
        r#"<h1 style="margin:0 0 6px 0;{FONT}font-size:20px;line-height:26px;color:{TEXT_COLOUR};word-wrap:break-word;">{}</h1>"#,
        escape(name)
    );
    let account = r
        .ad_account_id
        .as_ref()
        .map_or_else(|| "an unknown ad account".to_owned(), |a| a.act());
    let _ = write!(
        out,
        r#"<p style="margin:0 0 16px 0;color:{MUTED};">Export {} to ad account {}. Status: <strong style="color:{};">{}</strong>.</p>"#,
        escape(r.export_id.as_str()),
        escape(&account),
        tone.colour(),
        escape(&r.status.as_str().replace('_', " ")),
    );
    out.push('\n');
    if let Some(reason) = &r.reason {
        note(
            &mut out,
            tone,
            &format!("<strong>Reason:</strong> {}", escape(reason)),
        );
    }
    if r.dry_run {
        note(&mut out, Tone::Neutral, &escape(DRY_RUN_NOTE));
    }
    if r.status == ExportStatus::Cancelled {
        note(&mut out, Tone::Neutral, &escape(CANCELLED_NOTE));
    }

    // A refused job read nothing: its reason is the whole story.
    let read_anything = r.members_read > 0 || !r.audiences.is_empty() || r.malformed_records > 0;
    if r.status != ExportStatus::Rejected || read_anything {
        let mut rows = vec![Row::count("Members read", r.members_read)];
        if r.malformed_records > 0 {
            rows.push(Row::count(
                "Lines that were not a record",
                r.malformed_records,
            ));
        }
        if !r.excluded.is_empty() {
            rows.push(Row::count("Left out by consent", r.excluded.values().sum()));
        }
        data_table(&mut out, "The segment", &rows);
    }
    if !r.excluded.is_empty() {
        let rows: Vec<Row> = r
            .excluded
            .iter()
            .map(|(attribute, n)| Row::count(attribute, *n))
            .collect();
        data_table(&mut out, "Left out by consent, by attribute", &rows);
    }
    for a in &r.audiences {
        audience_html(&mut out, r, a);
    }
    // A refused job uploaded nothing for Meta to match.
    let footer = (r.status != ExportStatus::Rejected).then_some(MATCHING_NOTE);
    page(subject, tone, report_headline(r), &out, footer)
}

fn audience_html(out: &mut String, r: &FinishedReport, a: &AudienceReport) {
    let label = a.field.map(|f| f.label()).unwrap_or("Audience");
    if r.dry_run {
        heading(
            out,
            &format!(
                r#"{} audience <span style="font-weight:normal;color:{MUTED};">(dry run: not created)</span>"#,
                escape(label)
            ),
        );
    } else {
        heading(out, &format!("{} audience", escape(label)));
        let id = if a.audience_id.is_empty() {
            format!("({})", escape(NOT_CONFIRMED_NOTE))
        } else {
            format!("id {}", escape(&a.audience_id))
        };
        let _ = write!(
            out,
            r#"<p style="margin:0 0 6px 0;"><strong>{}</strong><br><span style="color:{MUTED};font-size:13px;">{id}</span></p>"#,
            escape(&a.name)
        );
        out.push('\n');
    }
    if let (false, false, Some(account)) = (r.dry_run, a.audience_id.is_empty(), &r.ad_account_id) {
        button(
            out,
            &ads_manager_url(account, &a.audience_id),
            "Open in Ads Manager",
        );
    }

    let mut rows = vec![
        Row::count("Members with a value", a.with_value),
        Row::count("Members without one", a.missing),
        Row::count("Invalid, not sent", a.invalid_total()),
    ];
    rows.extend(a.invalid.iter().map(|(reason, n)| Row::detail(reason, *n)));
    if a.prehashed > 0 {
        rows.push(Row::count("Already hashed, passed through", a.prehashed));
    }
    rows.push(Row::count("Duplicates, sent once", a.duplicates));
    if r.dry_run {
        rows.push(Row::count("Would upload", a.uploaded));
    } else {
        rows.push(Row::count("Uploaded", a.uploaded));
        rows.push(Row::count("Meta received", a.meta_received));
        rows.push(Row::count("Meta found invalid", a.meta_invalid));
        rows.extend(
            a.meta_invalid_reasons
                .iter()
                .map(|(reason, n)| Row::detail(reason, *n)),
        );
    }
    if let Some(size) = approximate_size(a) {
        rows.push(Row::text("Approximate size at Meta", &size));
    }
    if let Some(l) = &a.lookalike {
        let value = match (&l.audience_id, &l.error) {
            (Some(id), _) => format!(
                r#"{}<br><span style="color:{MUTED};font-size:13px;">id {}</span>"#,
                escape(&l.name),
                escape(id)
            ),
            (None, error) => format!(
                r#"{}<br><span style="color:{};font-size:13px;">not made{}</span>"#,
                escape(&l.name),
                Tone::Bad.colour(),
                error
                    .as_deref()
                    .map(|e| format!(": {}", escape(e)))
                    .unwrap_or_default()
            ),
        };
        let row = Row::html("Lookalike audience", value);
        rows.push(if l.audience_id.is_none() {
            row.alarm()
        } else {
            row
        });
    }
    if a.shards_failed > 0 {
        rows.push(
            Row::text(
                "Batches failed",
                &format!("{} of {}", thousands(a.shards_failed), thousands(a.shards)),
            )
            .alarm(),
        );
    }
    data_table(out, "Counts", &rows);
    if a.shards_failed > 0 {
        note(
            out,
            Tone::Bad,
            &format!(
                "<strong>Last error:</strong> {}",
                escape(a.last_error.as_deref().unwrap_or("no message"))
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use audience_export_core::contract::{ExportId, Field};
    use std::collections::BTreeMap;

    fn report_fixture() -> FinishedReport {
        FinishedReport {
            export_id: ExportId::parse("exp-42").unwrap(),
            status: ExportStatus::PartiallyFailed,
            reason: Some("1 of 12 batches failed".to_owned()),
            segment_name: "Spring buyers".to_owned(),
            ad_account_id: Some(AdAccountId::parse("1234567").unwrap()),
            members_read: 120_345,
            malformed_records: 3,
            excluded: BTreeMap::from([
                ("ads_tracking_enabled".to_owned(), 1_200),
                ("do_not_sell_or_share".to_owned(), 345),
            ]),
            dry_run: false,
            audiences: vec![
                AudienceReport {
                    field: Some(Field::Email),
                    audience_id: "23851234567890123".to_owned(),
                    name: "Spring buyers (email)".to_owned(),
                    with_value: 118_800,
                    missing: 0,
                    invalid: BTreeMap::from([("no @".to_owned(), 800)]),
                    prehashed: 5,
                    duplicates: 1_000,
                    uploaded: 117_000,
                    meta_received: 117_000,
                    meta_invalid: 12,
                    shards: 12,
                    shards_failed: 1,
                    last_error: Some("Meta said <b>no</b> & \"later\"".to_owned()),
                    meta_invalid_reasons: BTreeMap::from([("bad hash".to_owned(), 12)]),
                    approximate_count_lower_bound: Some(105_000),
                    approximate_count_upper_bound: Some(118_000),
                    lookalike: Some(LookalikeReport {
                        audience_id: Some("23859999999999999".to_owned()),
                        name: "Spring buyers lookalike 1%".to_owned(),
                        error: None,
                    }),
                },
                AudienceReport {
                    field: Some(Field::Phone),
                    audience_id: "23851234567890456".to_owned(),
                    name: "Spring buyers (phone)".to_owned(),
                    with_value: 64_000,
                    missing: 56_345,
                    uploaded: 63_900,
                    meta_received: 63_900,
                    shards: 7,
                    ..AudienceReport::default()
                },
            ],
            duration_ms: 61_000,
        }
    }

    fn mailer() -> Mailer {
        Mailer::new(
            "127.0.0.1",
            2525,
            "Audience export <exports@example.com>",
            std::time::Duration::from_secs(5),
        )
        .unwrap()
    }

    /// A MIME part: its content type and its decoded body.
    struct Part {
        content_type: String,
        body: String,
    }

    fn content_type(c: Option<&mail_parser::ContentType<'_>>) -> String {
        let c = c.expect("a Content-Type");
        let mut out = format!("{}/{}", c.c_type, c.c_subtype.as_deref().unwrap_or(""));
        if let Some(charset) = c.attribute("charset") {
            out.push_str(&format!("; charset={charset}"));
        }
        out
    }

    /// The top-level content type and the leaf parts of a `multipart/*` message, decoded (read
    /// by mail-parser, as the test harness's SMTP sink reads what the finalizer sends).
    fn parse(message: &Message) -> (String, Vec<Part>) {
        use mail_parser::MimeHeaders;
        let raw = message.formatted();
        let parsed = mail_parser::MessageParser::default()
            .parse(&raw)
            .expect("a MIME message");
        let parts = parsed
            .parts
            .iter()
            .filter(|p| !p.is_multipart())
            .map(|p| Part {
                content_type: content_type(p.content_type()),
                body: p
                    .text_contents()
                    .expect("a text part")
                    .replace("\r\n", "\n"),
            })
            .collect();
        (content_type(parsed.content_type()), parts)
    }

    #[test]
    fn a_report_is_multipart_alternative_with_text_first_then_html() {
        let email = report(&report_fixture());
        let message = mailer()
            .message(&["marketer@example.com".to_owned()], &email)
            .unwrap();
        let (content_type, parts) = parse(&message);
        assert!(
            content_type.starts_with("multipart/alternative"),
            "{content_type}"
        );
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].content_type, "text/plain; charset=utf-8");
        assert_eq!(parts[1].content_type, "text/html; charset=utf-8");
        assert_eq!(parts[0].body, email.text);
        assert_eq!(parts[1].body, email.html);
    }

    #[test]
    fn every_notice_is_multipart_alternative_too() {
        let ws = WorkspaceId::parse("ws-1").unwrap();
        for email in [
            connection_invalid(
                &ws,
                190,
                Some(460),
                "Session expired",
                "2026-12-03T10:00:00Z",
            ),
            expiry_warning(&ws, "2026-12-10", 3),
        ] {
            let message = mailer()
                .message(&["owner@example.com".to_owned()], &email)
                .unwrap();
            let (content_type, parts) = parse(&message);
            assert!(content_type.starts_with("multipart/alternative"));
            let types: Vec<&str> = parts.iter().map(|p| p.content_type.as_str()).collect();
            assert_eq!(
                types,
                ["text/plain; charset=utf-8", "text/html; charset=utf-8"]
            );
            assert_eq!(parts[0].body, email.text);
            assert_eq!(parts[1].body, email.html);
        }
    }

    #[test]
    fn nobody_to_send_to_is_no_recipient() {
        let email = report(&report_fixture());
        assert!(matches!(
            mailer().message(&["not an address".to_owned()], &email),
            Err(EmailError::NoRecipient)
        ));
    }

    #[test]
    fn escape_neutralises_markup_ampersands_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert_eq!(escape("Käufer – 10%"), "K&#xe4;ufer &#x2013; 10%");
        assert_eq!(escape("&amp;"), "&amp;amp;");
    }

    #[test]
    fn thousands_separates_groups_of_three() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(120_345), "120,345");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn the_html_holds_each_audience_with_its_id_link_and_counts() {
        let html = report(&report_fixture()).html;
        for id in ["23851234567890123", "23851234567890456"] {
            assert!(html.contains(&format!("id {id}")), "{id}");
            assert!(
                html.contains(&format!(
                    "https://business.facebook.com/adsmanager/audiences?act=1234567&amp;ids={id}"
                )),
                "link to {id}"
            );
        }
        assert_eq!(html.matches("Open in Ads Manager").count(), 2);
        for count in [
            "120,345", "118,800", "117,000", "1,000", "63,900", "56,345", "1,200", "345",
        ] {
            assert!(html.contains(&format!(">{count}</td>")), "{count}");
        }
        assert!(html.contains(">no @</th>"), "invalid by reason");
        assert!(html.contains(">bad hash</th>"), "Meta's invalid by reason");
        assert!(html.contains(">ads_tracking_enabled</th>"), "consent table");
        assert!(html.contains("about 105,000 &#x2013; 118,000 people"));
        assert!(html.contains("Spring buyers lookalike 1%"));
        assert!(html.contains("id 23859999999999999"));
        assert!(html.contains("1 of 12"), "batches failed");
        assert!(html.contains("within about 24 hours"));
        assert!(html.contains("#b45309"), "amber for partially failed");
    }

    #[test]
    fn the_html_escapes_what_comes_from_outside() {
        let mut r = report_fixture();
        r.segment_name = r#"<script>alert(1)</script> & "VIPs" 'x'"#.to_owned();
        r.audiences[0].name = "<img src=x onerror=alert(2)>".to_owned();
        r.audiences[0].invalid = BTreeMap::from([("<b>bad</b>".to_owned(), 1)]);
        r.audiences[0].lookalike = Some(LookalikeReport {
            audience_id: None,
            name: "LAL <i>".to_owned(),
            error: Some("origin < 100 & \"small\"".to_owned()),
        });
        let html = report(&r).html;
        assert!(!html.contains("<script"), "no script element");
        assert!(!html.contains("<img"), "no image element");
        assert!(!html.contains("<b>bad"), "reasons escaped");
        assert!(!html.contains("LAL <i>"));
        assert!(html
            .contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;VIPs&quot; &#39;x&#39;"));
        assert!(html.contains("Meta said &lt;b&gt;no&lt;/b&gt; &amp; &quot;later&quot;"));
        assert!(html.contains("not made: origin &lt; 100 &amp; &quot;small&quot;"));
        assert!(html.is_ascii());
    }

    #[test]
    fn the_html_fetches_nothing_and_runs_nothing() {
        let ws = WorkspaceId::parse("ws-1").unwrap();
        for html in [
            report(&report_fixture()).html,
            connection_invalid(&ws, 190, None, "<script>x</script>", "now").html,
            expiry_warning(&ws, "2026-12-10", 0).html,
        ] {
            let lower = html.to_ascii_lowercase();
            for banned in [
                "<script", "<img", "<link", "<style", "src=", "url(", "@import",
            ] {
                assert!(!lower.contains(banned), "{banned} in {html}");
            }
            // Every link goes to Ads Manager.
            for href in lower.split("href=\"").skip(1) {
                assert!(href.starts_with("https://business.facebook.com/"), "{href}");
            }
        }
    }

    #[test]
    fn the_status_line_is_coloured_by_status() {
        let mut r = report_fixture();
        for (status, colour) in [
            (ExportStatus::Succeeded, "#15803d"),
            (ExportStatus::PartiallyFailed, "#b45309"),
            (ExportStatus::Failed, "#b91c1c"),
            (ExportStatus::Rejected, "#b91c1c"),
            (ExportStatus::Cancelled, "#4b5563"),
        ] {
            r.status = status;
            let html = report(&r).html;
            assert!(
                html.contains(&format!("background-color:{colour};color:#ffffff;")),
                "{status}"
            );
        }
    }

    #[test]
    fn the_text_part_reads_as_before() {
        let mut r = report_fixture();
        // Without the fields the text part gained (Meta's reasons, size, lookalike).
        for a in &mut r.audiences {
            a.meta_invalid_reasons.clear();
            a.approximate_count_lower_bound = None;
            a.approximate_count_upper_bound = None;
            a.lookalike = None;
        }
        let expected = "\
Export exp-42 of segment \"Spring buyers\" to ad account act_1234567: partially_failed.
Reason: 1 of 12 batches failed

Members read: 120345
Lines that were not a record: 3
Left out by consent: 1545
  ads_tracking_enabled: 1200
  do_not_sell_or_share: 345

Email audience \"Spring buyers (email)\" (id 23851234567890123)
  Open: https://business.facebook.com/adsmanager/audiences?act=1234567&ids=23851234567890123
  Members with a value: 118800
  Members without one: 0
  Invalid, not sent: 800
    no @: 800
  Already hashed, passed through: 5
  Duplicates, sent once: 1000
  Uploaded: 117000
  Meta received: 117000, of which Meta found invalid: 12
  Batches failed: 1 of 12 (Meta said <b>no</b> & \"later\")

Phone audience \"Spring buyers (phone)\" (id 23851234567890456)
  Open: https://business.facebook.com/adsmanager/audiences?act=1234567&ids=23851234567890456
  Members with a value: 64000
  Members without one: 56345
  Invalid, not sent: 0
  Duplicates, sent once: 0
  Uploaded: 63900
  Meta received: 63900, of which Meta found invalid: 0

Meta matches the uploaded people within about 24 hours; it never tells who matched.
";
        assert_eq!(report(&r).text, expected);
        assert_eq!(
            report(&r).subject,
            "Facebook audience export of \"Spring buyers\" is complete, with errors"
        );
    }

    #[test]
    fn the_text_part_adds_metas_reasons_size_and_lookalike_when_known() {
        let text = report(&report_fixture()).text;
        assert!(text.contains(
            "  Meta received: 117000, of which Meta found invalid: 12\n    bad hash: 12\n"
        ));
        assert!(
            text.contains("  Approximate size at Meta: about 105,000 \u{2013} 118,000 people\n")
        );
        assert!(text.contains(
            "  Lookalike audience \"Spring buyers lookalike 1%\" (id 23859999999999999)\n"
        ));
    }

    #[test]
    fn dry_run_and_cancellation_notes_are_in_both_parts() {
        let mut r = report_fixture();
        r.dry_run = true;
        r.status = ExportStatus::Succeeded;
        let email = report(&r);
        assert_eq!(
            email.subject,
            "Facebook audience export of \"Spring buyers\" dry run is complete"
        );
        assert!(email.text.contains("This was a dry run"));
        assert!(email.text.contains("  Would upload: 117000"));
        assert!(email.html.contains("This was a dry run"));
        assert!(email.html.contains("Dry run complete"));
        assert!(email.html.contains(">Would upload</th>"));
        assert!(!email.html.contains("Open in Ads Manager"));

        let mut r = report_fixture();
        r.status = ExportStatus::Cancelled;
        let email = report(&r);
        assert!(email
            .text
            .contains("Nothing more was sent after the cancellation"));
        assert!(email
            .html
            .contains("Nothing more was sent after the cancellation"));
        assert!(email.html.contains("Export cancelled"));
    }

    #[test]
    fn a_rejected_export_says_why_without_empty_tables() {
        let r = FinishedReport {
            export_id: ExportId::parse("exp-9").unwrap(),
            status: ExportStatus::Rejected,
            reason: Some("missing field `fields`".to_owned()),
            segment_name: String::new(),
            ad_account_id: None,
            members_read: 0,
            malformed_records: 0,
            excluded: BTreeMap::new(),
            dry_run: false,
            audiences: Vec::new(),
            duration_ms: 0,
        };
        let email = report(&r);
        assert_eq!(
            email.subject,
            "Facebook audience export of \"exp-9\" could not start"
        );
        assert!(email.text.contains("Reason: missing field `fields`"));
        assert!(email.html.contains("missing field `fields`"));
        assert!(email.html.contains("Export could not start"));
        assert!(!email.html.contains("Members read"));
        assert!(!email.html.contains("within about 24 hours"));
    }

    #[test]
    fn the_connection_notices_read_as_before() {
        let ws = WorkspaceId::parse("ws-1").unwrap();
        let email = connection_invalid(
            &ws,
            190,
            Some(458),
            "Error validating access token",
            "2026-12-03T10:00:00Z",
        );
        assert_eq!(
            email.subject,
            "Facebook connection of workspace ws-1 must be reconnected"
        );
        assert_eq!(
            email.text,
            "\
Meta refused the Facebook connection of workspace ws-1 at 2026-12-03T10:00:00Z: the person who connected removed the app from their Facebook account.
Meta said: Error validating access token (code 190, subcode 458).

Exports running on this connection have stopped; each export's requester gets its own report.
New exports to Facebook from this workspace are refused until it is reconnected.

To reconnect: open the workspace's Facebook integration and connect again, or set a new Business Manager system user token.
Exports refused meanwhile do not restart by themselves: export those segments again once reconnected.
"
        );
        assert!(email.html.contains("removed the app"));
        assert!(email.html.contains("What to do"));

        let email = expiry_warning(&ws, "2026-12-10", 3);
        assert_eq!(
            email.text,
            "\
The Facebook connection of workspace ws-1 expires on 2026-12-10, in 3 day(s).
After that, exports to Facebook from this workspace fail until it is reconnected.

To renew it: open the workspace's Facebook integration and connect again. A Business Manager system user token does not expire this way; setting one avoids renewals.
"
        );
        assert!(email.html.contains("in 3 day(s)"));
        assert!(email.html.contains("#b45309"));
        let expired = expiry_warning(&ws, "2026-12-01", 0);
        assert!(expired
            .text
            .starts_with("The Facebook connection of workspace ws-1 expired on 2026-12-01.\n"));
    }
}
