//! A local S3 for the source tests: moto's `moto_server` (PyPI `moto[server]`, installed into
//! `.tools/venv` by `scripts/tools.sh`) on a free port, as a child process of the test, killed
//! when dropped. Objects are written through object_store, the client the producer reads with.

use crate::fault::free_port;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::ObjectStoreExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Credentials moto accepts (it checks none); the producer gets them like any AWS client would.
const ACCESS_KEY: &str = "testing";
const SECRET_KEY: &str = "testing";
const REGION: &str = "us-east-1";

pub struct S3Server {
    pub port: u16,
    child: Child,
}

impl S3Server {
    /// Starts `moto_server` and waits until it answers.
    pub async fn start() -> S3Server {
        let binary = moto_server();
        assert!(
            binary.exists(),
            "{} is missing: run scripts/tools.sh (it installs moto[server] into .tools/venv)",
            binary.display()
        );
        let port = free_port();
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", binary.display()));
        let server = S3Server { port, child };
        let url = format!("{}/moto-api/", server.endpoint());
        let up = crate::app::eventually(Duration::from_secs(30), || {
            let url = url.clone();
            async move {
                let answer = reqwest::get(url).await.ok()?;
                answer.status().is_success().then_some(())
            }
        })
        .await;
        assert!(up.is_some(), "moto_server answers on port {port}");
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The standard AWS variables that point a process (the producer) at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", REGION.into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Creates `bucket` (object_store has no call for it: a plain `PUT /<bucket>`).
    pub async fn create_bucket(&self, bucket: &str) {
        let answer = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.endpoint()))
            .send()
            .await
            .expect("moto_server answers");
        assert!(
            answer.status().is_success(),
            "creating bucket {bucket}: {}",
            answer.status()
        );
    }

    /// A client of `bucket`, configured explicitly (nothing read from this process' environment).
    pub fn bucket(&self, bucket: &str) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_region(REGION)
            .with_bucket_name(bucket)
            .build()
            .expect("an S3 client of the test's server")
    }

    /// Writes an object.
    pub async fn put(&self, bucket: &str, key: &str, bytes: Vec<u8>) {
        self.bucket(bucket)
            .put(&object_store::path::Path::from(key), bytes.into())
            .await
            .expect("writing the object");
    }
}

/// Where `scripts/tools.sh` installs it.
fn moto_server() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/moto_server")
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
