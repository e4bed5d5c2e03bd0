//! Migrations against a real PostgreSQL server: apply once, refuse edits, pick up new files.

#![allow(clippy::unwrap_used)] // Fixture helpers outside #[test] fail loudly by design.

use std::path::{Path, PathBuf};

use repository::migrations::{self, MigrationError};
use testkit::TestDb;

fn project_migrations() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations")
}

/// A private copy of the project's migrations that a test may edit.
fn copy_of_migrations(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("migrations-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(project_migrations()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

#[tokio::test]
async fn apply_to_an_empty_database_then_nothing_the_second_time() {
    let db = TestDb::empty().await;
    let mut client = repository::connect(&db.config()).await.unwrap();

    let status = migrations::status(&mut client, &project_migrations())
        .await
        .unwrap();
    assert!(status.applied.is_empty());
    assert!(!status.pending.is_empty());

    let applied = migrations::apply(&mut client, &project_migrations())
        .await
        .unwrap();
    assert_eq!(applied.len(), status.pending.len());
    assert_eq!(applied[0].version, 1);
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_name IN ('users', 'orders', 'reviews')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 3);

    let again = migrations::apply(&mut client, &project_migrations())
        .await
        .unwrap();
    assert!(again.is_empty());
    let status = migrations::status(&mut client, &project_migrations())
        .await
        .unwrap();
    assert!(status.pending.is_empty());
    assert!(status.divergent.is_empty());
    assert_eq!(status.applied.len(), applied.len());
}

#[tokio::test]
async fn an_edited_applied_migration_is_refused() {
    let db = TestDb::empty().await;
    let mut client = repository::connect(&db.config()).await.unwrap();
    let dir = copy_of_migrations("edited");
    migrations::apply(&mut client, &dir).await.unwrap();

    let file = dir.join("V1__schema.sql");
    let mut sql = std::fs::read_to_string(&file).unwrap();
    sql.push_str("\nCREATE INDEX users_email_idx ON users (email);\n");
    std::fs::write(&file, sql).unwrap();

    let err = migrations::apply(&mut client, &dir).await.unwrap_err();
    assert!(
        matches!(err, MigrationError::Divergent { version: 1, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("edited"), "{err}");
    let status = migrations::status(&mut client, &dir).await.unwrap();
    assert_eq!(status.divergent.len(), 1);
    // Nothing of the edit reached the database.
    let index: Option<String> = client
        .query_one("SELECT to_regclass('users_email_idx')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(index, None);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_new_file_is_picked_up_and_a_failing_one_rolls_back() {
    let db = TestDb::empty().await;
    let mut client = repository::connect(&db.config()).await.unwrap();
    let dir = copy_of_migrations("added");
    migrations::apply(&mut client, &dir).await.unwrap();

    std::fs::write(
        dir.join("V900__add_note.sql"),
        "ALTER TABLE users ADD COLUMN note text;",
    )
    .unwrap();
    let applied = migrations::apply(&mut client, &dir).await.unwrap();
    assert_eq!(
        applied.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        vec!["add_note"]
    );

    std::fs::write(
        dir.join("V901__broken.sql"),
        "ALTER TABLE users ADD COLUMN extra text; SELECT * FROM no_such_table;",
    )
    .unwrap();
    let err = migrations::apply(&mut client, &dir).await.unwrap_err();
    assert!(matches!(err, MigrationError::Failed(_)), "{err:?}");
    // The failed migration's first statement was rolled back with it.
    let column: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_name = 'users' AND column_name = 'extra'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(column, 0);
    let status = migrations::status(&mut client, &dir).await.unwrap();
    assert_eq!(
        status.pending.iter().map(|m| m.version).collect::<Vec<_>>(),
        vec![901]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_missing_directory_is_a_load_error() {
    let db = TestDb::empty().await;
    let mut client = repository::connect(&db.config()).await.unwrap();
    let err = migrations::apply(&mut client, Path::new("/no/such/dir"))
        .await
        .unwrap_err();
    assert!(matches!(err, MigrationError::Load { .. }), "{err:?}");
}
