//! TLS to PostgreSQL. `cargo xtask test` runs its cluster with `ssl = on` and a server certificate
//! for `localhost` and 127.0.0.1 from a certificate authority of its own, whose certificate is in
//! `DATABASE_TLS_CA_FILE`.

#![allow(clippy::unwrap_used)] // Fixture helpers outside #[test] fail loudly by design.

use std::path::PathBuf;
use std::time::Duration;

use repository::{Database, DbConfig, Error};
use testkit::{TableLock, TestDb, insert_fixtures};

fn authority() -> PathBuf {
    std::env::var_os("DATABASE_TLS_CA_FILE")
        .expect("DATABASE_TLS_CA_FILE is set by cargo xtask test")
        .into()
}

/// `db`'s settings with `query` added to the URL (and the host swapped for `host`, if given).
fn with_query(db: &TestDb, query: &str, host: Option<&str>) -> DbConfig {
    let mut url = db.url().to_owned();
    if let Some(host) = host {
        url = url.replace("@127.0.0.1:", &format!("@{host}:"));
    }
    DbConfig {
        url: format!("{url}?{query}"),
        ..db.config()
    }
}

/// Whether the session of `conn` is encrypted, as the server sees it.
async fn encrypted(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn sslmode_require_reads_over_verified_tls_and_other_modes_stay_plain() {
    let db = TestDb::create().await;
    insert_fixtures(&db).await;
    let required = Database::connect_lazy(&DbConfig {
        tls_ca_file: Some(authority()),
        ..with_query(&db, "sslmode=require", None)
    })
    .unwrap();
    let conn = required.conn().await.unwrap();
    assert!(encrypted(conn.client()).await);
    assert_eq!(conn.profile(1).await.unwrap().unwrap().username, "ada");
    assert_eq!(conn.orders(1).await.unwrap().items.len(), 2);
    drop(conn);
    // Its health check connects the same way.
    let states = required.states(Duration::from_secs(5)).await;
    assert_eq!(states[0].reach, repository::Reach::Up, "{states:?}");
    // A single connection for tools, too.
    let direct = repository::connect(&DbConfig {
        tls_ca_file: Some(authority()),
        ..with_query(&db, "sslmode=require", None)
    })
    .await
    .unwrap();
    assert!(encrypted(&direct).await);

    for plain in [db.config(), with_query(&db, "sslmode=disable", None)] {
        let database = Database::connect_lazy(&plain).unwrap();
        assert!(!encrypted(database.conn().await.unwrap().client()).await);
    }
}

#[tokio::test]
async fn a_server_whose_certificate_does_not_verify_is_refused() {
    let db = TestDb::create().await;
    // Not signed by anything this system trusts: the run's own authority is not given.
    let untrusted = Database::connect_lazy(&with_query(&db, "sslmode=require", None));
    match untrusted {
        Ok(database) => {
            let error = database.conn().await.unwrap_err();
            assert!(
                matches!(&error, Error::Unavailable(why) if why.contains("certificate")),
                "{error:?}"
            );
        }
        // A system without any CA certificates says so at once.
        Err(error) => assert!(
            matches!(&error, Error::Config(why) if why.contains("CA certificates")),
            "{error:?}"
        ),
    }
    // Signed by the authority, but not for the name asked for.
    let misnamed = Database::connect_lazy(&DbConfig {
        tls_ca_file: Some(authority()),
        ..with_query(
            &db,
            "sslmode=require&hostaddr=127.0.0.1",
            Some("db.example.com"),
        )
    })
    .unwrap();
    let error = misnamed.conn().await.unwrap_err();
    assert!(
        matches!(&error, Error::Unavailable(why) if why.contains("certificate")),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_ca_file_that_cannot_be_used_is_a_settings_error_naming_it() {
    let db = TestDb::create().await;
    let dir = std::env::temp_dir().join(format!("tls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_pem = dir.join("not-pem.crt");
    std::fs::write(&not_pem, "hello").unwrap();
    for file in [dir.join("missing.crt"), not_pem] {
        let error = Database::connect_lazy(&DbConfig {
            tls_ca_file: Some(file.clone()),
            ..with_query(&db, "sslmode=require", None)
        })
        .unwrap_err();
        assert!(
            matches!(&error, Error::Config(why)
                if why.contains("database.tls_ca_file") && why.contains(&*file.to_string_lossy())),
            "{error:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_abandoned_statement_is_cancelled_over_tls_too() {
    let db = TestDb::create().await;
    insert_fixtures(&db).await;
    let database = Database::connect_lazy(&DbConfig {
        tls_ca_file: Some(authority()),
        application_name: "abandon-tls-test".into(),
        ..with_query(&db, "sslmode=require", None)
    })
    .unwrap();
    let lock = TableLock::take(&db, "users").await;
    let conn = database.conn().await.unwrap();
    let abandoned = tokio::time::timeout(Duration::from_millis(200), conn.profile(1)).await;
    assert!(abandoned.is_err(), "the read should still be waiting");
    drop(conn);
    // The cancel request (sent over TLS, as the session was opened) stops it on the server.
    let admin = repository::connect(&db.admin_config()).await.unwrap();
    let mut active: i64 = -1;
    for _ in 0..100 {
        active = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'abandon-tls-test' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lock.release().await;
    assert_eq!(active, 0, "the abandoned statement is still running");
}
