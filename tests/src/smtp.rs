//! A local SMTP sink: accepts every message over real SMTP, keeps it in memory for assertions
//! and, when given a folder, writes it there as an `.eml` file (the demo's mailbox). It speaks
//! just enough of RFC 5321 for a client such as lettre: no TLS, no auth, no relaying.

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
    /// The body after the header block.
    /// The body after the header block, decoded when it was sent quoted-printable.
    pub fn body(&self) -> String {
        let (headers, body) = self.data.split_once("\r\n\r\n").unwrap_or(("", ""));
        let qp = headers
            .lines()
            .any(|l| l.eq_ignore_ascii_case("Content-Transfer-Encoding: quoted-printable"));
        if qp {
            decode_quoted_printable(body)
        } else {
            body.to_owned()
        }
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

/// RFC 2045 quoted-printable: `=\r\n` is a soft line break, `=XX` a byte.
fn decode_quoted_printable(s: &str) -> String {
    let joined = s.replace("=\r\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&joined[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn quoted_printable_is_decoded() {
        assert_eq!(
            super::decode_quoted_printable("a=3Db=\r\nc =C3=A4\r\n"),
            "a=bc \u{e4}\r\n"
        );
    }
}
