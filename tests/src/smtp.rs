//! A local SMTP sink: accepts every message over real SMTP, keeps it in memory for assertions
//! and, when given a folder, writes it there as an `.eml` file (the demo's mailbox). It speaks
//! just enough of RFC 5321 for a client such as lettre: no TLS, no auth, no relaying.

use mail_parser::MimeHeaders;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One received message.
#[derive(Debug, Clone, PartialEq)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    /// Headers and body as sent, dot-unstuffed, CRLF line ends.
    pub data: String,
}

impl Mail {
    pub fn subject(&self) -> Option<&str> {
        self.data.lines().find_map(|l| l.strip_prefix("Subject: "))
    }
    /// The plain-text part (of a multipart message, or the whole body of a single-part one),
    /// decoded, with CRLF line ends as sent.
    pub fn body(&self) -> String {
        self.part(|m| m.body_text(0).map(|t| t.into_owned()))
    }

    /// The HTML part, decoded; empty when the message has none.
    pub fn html(&self) -> String {
        self.part(|m| m.body_html(0).map(|t| t.into_owned()))
    }

    fn part(&self, pick: impl Fn(&mail_parser::Message<'_>) -> Option<String>) -> String {
        let text = mail_parser::MessageParser::default()
            .parse(self.data.as_bytes())
            .and_then(|m| pick(&m))
            .unwrap_or_default();
        // mail-parser hands parts back with LF or CRLF as decoded; the suite reads CRLF.
        text.replace("\r\n", "\n").replace('\n', "\r\n")
    }

    /// Whether the message is `multipart/alternative` with a text and an HTML part.
    pub fn is_alternative(&self) -> bool {
        mail_parser::MessageParser::default()
            .parse(self.data.as_bytes())
            .is_some_and(|m| {
                m.content_type()
                    .is_some_and(|c| c.c_type == "multipart" && c.subtype() == Some("alternative"))
                    && m.text_body_count() >= 1
                    && m.html_body_count() >= 1
            })
    }
}

#[derive(Clone)]
pub struct SmtpSink {
    pub addr: SocketAddr,
    mails: Arc<Mutex<Vec<Mail>>>,
    arrived: Arc<Notify>,
    stop: CancellationToken,
    /// While set, every connection is closed at once, as a relay that is down.
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl SmtpSink {
    /// Listens on `addr`; writes each message into `folder` too when given.
    pub async fn start(addr: SocketAddr, folder: Option<PathBuf>) -> std::io::Result<SmtpSink> {
        let listener = TcpListener::bind(addr).await?;
        let sink = SmtpSink {
            addr: listener.local_addr()?,
            mails: Arc::default(),
            arrived: Arc::default(),
            stop: CancellationToken::new(),
            down: Arc::default(),
        };
        let accepting = sink.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = accepting.stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                if accepting.down.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(stream);
                    continue;
                }
                let session = accepting.clone();
                let folder = folder.clone();
                tokio::spawn(async move {
                    let _ =
                        session_loop(stream, |mail| session.deliver(mail, folder.as_deref())).await;
                });
            }
        });
        Ok(sink)
    }

    fn deliver(&self, mail: Mail, folder: Option<&std::path::Path>) {
        let mut mails = self.mails.lock().expect("sink lock");
        if let Some(dir) = folder {
            // The raw message, and its decoded text for people reading the demo's mailbox.
            let n = mails.len() + 1;
            let _ = std::fs::write(dir.join(format!("{n:04}.eml")), &mail.data);
            let text = format!(
                "Subject: {}\n\n{}",
                mail.subject().unwrap_or_default(),
                mail.body().replace("\r\n", "\n")
            );
            let _ = std::fs::write(dir.join(format!("{n:04}.txt")), text);
        }
        mails.push(mail);
        drop(mails);
        self.arrived.notify_waiters();
    }

    pub async fn on_free_port() -> SmtpSink {
        SmtpSink::start(([127, 0, 0, 1], 0).into(), None)
            .await
            .expect("binding a loopback port")
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().expect("sink lock").clone()
    }

    /// Waits until a message matching `pred` has arrived, or the deadline passes.
    pub async fn wait_for(&self, deadline: Duration, pred: impl Fn(&Mail) -> bool) -> Option<Mail> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let notified = self.arrived.notified();
            if let Some(m) = self.mails().into_iter().find(|m| pred(m)) {
                return Some(m);
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return None;
            }
        }
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Takes the relay down (every connection is closed at once) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn session_loop(stream: TcpStream, on_mail: impl Fn(Mail)) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let (mut from, mut to) = (String::new(), Vec::new());
    write.write_all(b"220 smtp-sink ESMTP ready\r\n").await?;
    while let Some(line) = lines.next_line().await? {
        let upper = line.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-smtp-sink\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
        } else if upper.starts_with("HELO") || upper.starts_with("NOOP") {
            b"250 OK\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            from = address(&line[10..]);
            to.clear();
            b"250 OK\r\n"
        } else if upper.starts_with("RCPT TO:") {
            to.push(address(&line[8..]));
            b"250 OK\r\n"
        } else if upper.starts_with("RSET") {
            from.clear();
            to.clear();
            b"250 OK\r\n"
        } else if upper == "DATA" {
            write
                .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                .await?;
            let mut data = String::new();
            while let Some(l) = lines.next_line().await? {
                if l == "." {
                    break;
                }
                data.push_str(l.strip_prefix('.').unwrap_or(&l));
                data.push_str("\r\n");
            }
            on_mail(Mail {
                from: from.clone(),
                to: std::mem::take(&mut to),
                data,
            });
            b"250 OK queued\r\n"
        } else if upper.starts_with("QUIT") {
            write.write_all(b"221 Bye\r\n").await?;
            break;
        } else {
            b"502 Command not implemented\r\n"
        };
        write.write_all(reply).await?;
    }
    Ok(())
}

fn address(arg: &str) -> String {
    let arg = arg.trim();
    let inner = arg
        .split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map(|(a, _)| a)
        .unwrap_or(arg);
    inner.to_owned()
}

#[cfg(test)]
mod tests {
    use super::Mail;

    #[test]
    fn the_text_and_html_parts_of_a_multipart_message_are_read_decoded() {
        let long = "ä".repeat(60);
        let message = lettre::Message::builder()
            .from("a@example.com".parse().unwrap())
            .to("b@example.com".parse().unwrap())
            .subject("s")
            .multipart(lettre::message::MultiPart::alternative_plain_html(
                format!("Uploaded: 5\n{long}\n"),
                "<p>Uploaded: <b>5</b></p>".to_owned(),
            ))
            .unwrap();
        let mail = Mail {
            from: "a@example.com".into(),
            to: vec!["b@example.com".into()],
            data: String::from_utf8(message.formatted()).unwrap(),
        };
        assert!(mail.is_alternative());
        assert_eq!(mail.body(), format!("Uploaded: 5\r\n{long}\r\n"));
        assert_eq!(mail.html(), "<p>Uploaded: <b>5</b></p>");
    }
}
