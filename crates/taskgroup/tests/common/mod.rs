//! Helpers shared by the property tests.

use std::sync::{Mutex, MutexGuard, Once};

/// Serialises the cases of every test in a binary, because the gauge is process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub const SCRIPTED_PANIC: &str = "scripted panic";

/// Keeps the scripted panics out of the test output; any other panic is printed as usual.
pub fn quiet_scripted_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&SCRIPTED_PANIC) {
                default(info);
            }
        }));
    });
}
