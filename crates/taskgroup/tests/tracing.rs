//! Visibility: children run inside the spawner's `tracing` span, and a child's panic is logged at
//! once (before anyone joins) at `ERROR` level with the group's and the child's names.
//!
//! The logs are captured with `tracing-subscriber`'s plain-text formatter writing into a buffer.
#![allow(clippy::unwrap_used)] // Test support outside #[test] functions.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskgroup::TaskGroup;

/// A log sink shared between the subscriber and the test.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `test` on a paused current-thread runtime with a capturing subscriber as the default,
/// and returns the log lines.
fn logs_of(test: impl Future<Output = ()>) -> Vec<String> {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .without_time()
        .with_writer(move || writer.clone())
        .finish();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || runtime.block_on(test));
    let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    text.lines().map(str::to_owned).collect()
}

#[test]
fn children_run_in_the_spawners_span() {
    let logs = logs_of(async {
        let group = TaskGroup::<String>::new().unwrap();
        tracing::info_span!("request", id = 7).in_scope(|| {
            group.spawn("child", async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                tracing::info!("inside the child");
                Ok(())
            });
        });
        group.join().await.unwrap();
    });
    let line = logs
        .iter()
        .find(|l| l.contains("inside the child"))
        .unwrap();
    assert!(line.contains("request{id=7}"), "{line}");
}

#[test]
fn a_panic_is_logged_at_once_with_the_childs_name() {
    let logs = logs_of(async {
        let group = TaskGroup::<String>::builder()
            .name("dashboard")
            .build()
            .unwrap();
        group.spawn("recommendations", async {
            panic!("bad payload");
            #[allow(unreachable_code)]
            Ok(())
        });
        // Nobody ever joins this group: the panic must be logged anyway.
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(group);
    });
    let line = logs.iter().find(|l| l.contains("ERROR")).unwrap();
    assert!(line.contains("group=dashboard"), "{line}");
    assert!(line.contains("child=recommendations"), "{line}");
    assert!(line.contains("panic=bad payload"), "{line}");
}
