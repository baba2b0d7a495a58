//! A fleet upgraded in place keeps its workspaces' connections: keys an earlier build wrote
//! without hash tags (`{ns}:workspace:<id>:connection`) are renamed when a role starts.

use audience_export_harness::app::{spawn_app_with, ws, Roles, WORKSPACE};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_stored_before_the_hash_tags_is_found_after_a_role_starts() {
    let app = spawn_app_with(Roles::NONE, |_| {}).await;
    let ns = app.namespace().to_owned();
    let client = redis::Client::open(app.settings.redis_url.as_str()).expect("url");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    // What an earlier build left: the same connection under the untagged name.
    let tagged = format!("{ns}:workspace:{{{WORKSPACE}}}:connection");
    let untagged = format!("{ns}:workspace:{WORKSPACE}:connection");
    let _: () = redis::cmd("RENAME")
        .arg(&tagged)
        .arg(&untagged)
        .query_async(&mut c)
        .await
        .expect("RENAME");
    assert!(
        app.connections
            .view(&ws(WORKSPACE))
            .await
            .expect("read")
            .is_none(),
        "the new build does not see the old name by itself"
    );

    let shutdown = CancellationToken::new();
    let producer = audience_export_producer::start(app.settings.clone(), shutdown.clone())
        .await
        .expect("the producer starts");

    let view = app
        .connections
        .view(&ws(WORKSPACE))
        .await
        .expect("read")
        .expect("the connection is found under its tagged name");
    assert!(view.is_valid());
    let old: bool = redis::cmd("EXISTS")
        .arg(&untagged)
        .query_async(&mut c)
        .await
        .expect("EXISTS");
    assert!(!old, "nothing is left under the old name");
    shutdown.cancel();
    producer
        .task
        .await
        .expect("joins")
        .expect("the producer stops cleanly");
    app.stop().await;
}
