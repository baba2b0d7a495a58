//! The emails' HTML parts in a real browser: headless Chromium (Debian's, installed by
//! `just tools`) screenshots each at a mail client's width, and the picture must show the email
//! (its banner in the status colour, text in the tables, as tall as its content) rather than a
//! blank or error page. The report's segment name carries a script that would empty the page if
//! it ran, so an escaping mistake shows up as a blank screenshot too.
//!
//! The screenshots stay in `target/tmp/email-render/` for people to look at.

use audience_export_core::contract::{
    AdAccountId, AudienceReport, ExportId, ExportStatus, Field, FinishedReport, LookalikeReport,
    WorkspaceId,
};
use audience_export_finalizer::email;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const CHROMIUM: &str = "/usr/bin/chromium";
/// A cold start of Chromium on a busy 2-core machine takes a few seconds; a hung one is cut.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);
/// Wider than the emails' 600 px card, as a mail client's reading pane; tall enough for the whole
/// three-audience report.
const WINDOW: (u32, u32) = (700, 2400);

/// What the report's HTML would run if a segment name reached it unescaped.
const HOSTILE_NAME: &str =
    r#"Spring <script>document.body.innerHTML=''</script> buyers & "VIPs" <b>2026</b>"#;

fn audience(field: Field, id: &str, name: &str) -> AudienceReport {
    AudienceReport {
        field: Some(field),
        audience_id: id.to_owned(),
        name: name.to_owned(),
        ..AudienceReport::default()
    }
}

/// An export of a 250,000-member segment to three audiences, one batch of phones failed, consent
/// exclusions, invalid values by reason, Meta's own refusals, sizes and lookalikes.
fn realistic_report() -> FinishedReport {
    let email = AudienceReport {
        with_value: 231_482,
        missing: 5_318,
        invalid: BTreeMap::from([
            ("no domain".to_owned(), 1_204),
            ("not an email address".to_owned(), 2_911),
        ]),
        prehashed: 12_000,
        duplicates: 3_377,
        uploaded: 223_990,
        meta_received: 223_990,
        meta_invalid: 41,
        shards: 23,
        meta_invalid_reasons: BTreeMap::from([("invalid hash".to_owned(), 41)]),
        approximate_count_lower_bound: Some(105_000),
        approximate_count_upper_bound: Some(118_000),
        lookalike: Some(LookalikeReport {
            audience_id: Some("23851000000000777".to_owned()),
            name: "Spring buyers, lookalike 1% US".to_owned(),
            error: None,
        }),
        ..audience(
            Field::Email,
            "23851000000000101",
            "Spring buyers \u{2014} exp-2026-05 \u{2014} email",
        )
    };
    let phone = AudienceReport {
        with_value: 180_220,
        missing: 56_580,
        invalid: BTreeMap::from([
            ("no country code".to_owned(), 3_002),
            ("too short".to_owned(), 618),
        ]),
        duplicates: 910,
        uploaded: 165_690,
        meta_received: 165_690,
        meta_invalid: 0,
        shards: 19,
        shards_failed: 1,
        last_error: Some(
            "(#2650) Please reduce the amount of data you're asking for, then retry".to_owned(),
        ),
        approximate_count_lower_bound: Some(71_300),
        approximate_count_upper_bound: Some(83_900),
        lookalike: Some(LookalikeReport {
            audience_id: None,
            name: "Spring buyers, lookalike 1% US (phone)".to_owned(),
            error: Some(
                "The source audience is too small: at least 100 people are needed <min>".to_owned(),
            ),
        }),
        ..audience(
            Field::Phone,
            "23851000000000102",
            "Spring buyers \u{2014} exp-2026-05 \u{2014} phone",
        )
    };
    let madid = AudienceReport {
        with_value: 97_005,
        missing: 139_795,
        invalid: BTreeMap::from([("not a device id".to_owned(), 77)]),
        duplicates: 12,
        uploaded: 96_916,
        meta_received: 96_916,
        shards: 10,
        approximate_count_upper_bound: Some(1_000),
        ..audience(
            Field::Madid,
            "23851000000000103",
            "Spring buyers \u{2014} exp-2026-05 \u{2014} madid",
        )
    };
    FinishedReport {
        export_id: ExportId::parse("exp-2026-05").expect("an export id"),
        status: ExportStatus::PartiallyFailed,
        reason: Some("1 of 52 batches failed (phone #7)".to_owned()),
        segment_name: HOSTILE_NAME.to_owned(),
        ad_account_id: Some(AdAccountId::parse("act_1234567890").expect("an ad account")),
        members_read: 250_000,
        malformed_records: 14,
        excluded: BTreeMap::from([
            ("ads_tracking_enabled".to_owned(), 9_120),
            ("do_not_sell_or_share".to_owned(), 4_080),
        ]),
        dry_run: false,
        audiences: vec![email, phone, madid],
        duration_ms: 312_000,
    }
}

/// A decoded screenshot: RGB pixels, row by row.
struct Picture {
    width: usize,
    height: usize,
    rgb: Vec<[u8; 3]>,
}

impl Picture {
    fn decode(path: &Path) -> Picture {
        let file = std::fs::File::open(path).expect("the screenshot");
        let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder.read_info().expect("a PNG");
        let mut buf = vec![0; reader.output_buffer_size().expect("a sane size")];
        let info = reader.next_frame(&mut buf).expect("a PNG frame");
        let channels = info.color_type.samples();
        assert!(
            channels >= 3,
            "a colour screenshot, not {:?}",
            info.color_type
        );
        let rgb = buf[..info.buffer_size()]
            .chunks_exact(channels)
            .map(|p| [p[0], p[1], p[2]])
            .collect();
        Picture {
            width: info.width as usize,
            height: info.height as usize,
            rgb,
        }
    }

    fn distinct_colours(&self) -> usize {
        self.rgb.iter().collect::<HashSet<_>>().len()
    }

    /// Pixels within 3 of `hex` (`#rrggbb`) in every channel.
    fn count_near(&self, hex: &str) -> usize {
        let want = [1, 3, 5].map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"));
        self.rgb
            .iter()
            .filter(|p| (0..3).all(|c| p[c].abs_diff(want[c]) <= 3))
            .count()
    }

    /// Rows holding dark pixels (text): how much there is to read.
    fn rows_with_text(&self) -> usize {
        self.rgb
            .chunks_exact(self.width)
            .filter(|row| {
                row.iter()
                    .any(|p| p.iter().map(|&c| u32::from(c)).sum::<u32>() < 3 * 110)
            })
            .count()
    }
}

/// Writes `html` to a file and screenshots it with headless Chromium into
/// `target/tmp/email-render/<name>.png`.
async fn screenshot(name: &str, html: &str) -> (PathBuf, Picture) {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run `just tools` (scripts/tools.sh installs Debian's chromium)"
    );
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("email-render");
    let run_dir = out_dir.join(format!("{name}-{}", uuid::Uuid::new_v4()));
    let profile = run_dir.join("profile");
    std::fs::create_dir_all(&profile).expect("a temporary folder");
    let page = run_dir.join(format!("{name}.html"));
    std::fs::write(&page, html).expect("writing the HTML part");
    let png = out_dir.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&png);

    let run = tokio::process::Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--window-size={},{}", WINDOW.0, WINDOW.1))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(CHROMIUM_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("chromium took over {CHROMIUM_TIMEOUT:?}"))
        .expect("running chromium");
    let _ = std::fs::remove_dir_all(&run_dir);
    assert!(
        output.status.success() && png.exists(),
        "chromium made no screenshot ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    println!("Screenshot: {}", png.display());
    let picture = Picture::decode(&png);
    assert_eq!(
        (picture.width, picture.height),
        (WINDOW.0 as usize, WINDOW.1 as usize),
        "the window's size"
    );
    (png, picture)
}

#[tokio::test]
async fn the_report_renders_in_a_browser_with_its_banner_tables_and_text() {
    let email = email::report(&realistic_report());
    let (png, picture) = screenshot("report", &email.html).await;

    // The amber banner, 600 px wide: over 20,000 pixels of exactly that colour. A blank page, an
    // error page or a page emptied by an unescaped script has none.
    let banner = picture.count_near("#b45309");
    assert!(banner > 20_000, "{}: {banner} amber pixels", png.display());
    // Text: anti-aliased glyphs in several colours make hundreds of distinct colours.
    let colours = picture.distinct_colours();
    assert!(colours > 100, "{}: {colours} colours", png.display());
    // Three audiences' tables make a long email: text on some 900 rows of pixels (a page that
    // showed only the banner and the name would have under 100).
    let rows = picture.rows_with_text();
    assert!(rows > 600, "{}: text on {rows} rows", png.display());
    // The whole card fits the window: its last rows are the backdrop again.
    let bottom = &picture.rgb[picture.width * (picture.height - 10)..];
    assert!(
        bottom.iter().all(|p| *p == [0xf3, 0xf4, 0xf6]),
        "{}: the email runs past the window's {} px",
        png.display(),
        WINDOW.1
    );
}

#[tokio::test]
async fn the_connection_notice_renders_in_a_browser() {
    let workspace = WorkspaceId::parse("ws-acme").expect("a workspace id");
    let email = email::connection_invalid(
        &workspace,
        190,
        Some(460),
        "Error validating access token: The session has been invalidated <because> the user changed their password & more",
        "2026-12-03T10:00:00Z",
    );
    let (png, picture) = screenshot("connection-invalid", &email.html).await;
    let banner = picture.count_near("#b91c1c");
    assert!(banner > 20_000, "{}: {banner} red pixels", png.display());
    let colours = picture.distinct_colours();
    assert!(colours > 100, "{}: {colours} colours", png.display());
    let rows = picture.rows_with_text();
    assert!(rows > 100, "{}: text on {rows} rows", png.display());
}

#[tokio::test]
async fn a_rejected_export_renders_its_reason_in_a_browser() {
    let report = FinishedReport {
        export_id: ExportId::parse("exp-2026-06").expect("an export id"),
        status: ExportStatus::Rejected,
        reason: Some(
            "ad account act_1234567890 has not accepted Meta's Custom Audience terms: accept them at https://business.facebook.com/ads/manage/customaudiences/tos/?act=1234567890 and export again".to_owned(),
        ),
        segment_name: "Lapsed buyers".to_owned(),
        ad_account_id: Some(AdAccountId::parse("1234567890").expect("an ad account")),
        members_read: 0,
        malformed_records: 0,
        excluded: BTreeMap::new(),
        dry_run: false,
        audiences: Vec::new(),
        duration_ms: 40,
    };
    let email = email::report(&report);
    let (png, picture) = screenshot("rejected", &email.html).await;
    let banner = picture.count_near("#b91c1c");
    assert!(banner > 20_000, "{}: {banner} red pixels", png.display());
    let rows = picture.rows_with_text();
    assert!(rows > 60, "{}: text on {rows} rows", png.display());
}
