//! The layering is the compiler's to enforce: `api` may depend on `service` and on nothing below
//! it, so it cannot name a repository, client or task-group type, and every answer reaches it in
//! the service's own types. This checks the manifest that makes that so.
#![allow(clippy::unwrap_used)]

#[test]
fn api_depends_on_the_service_and_on_nothing_below_it() {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let dependencies: Vec<&str> = manifest
        .lines()
        .skip_while(|line| line.trim() != "[dependencies]")
        .skip(1)
        .take_while(|line| !line.starts_with('['))
        .filter_map(|line| line.split(['=', '.']).next())
        .map(str::trim)
        .filter(|name| !name.is_empty() && !name.starts_with('#'))
        .collect();
    assert!(dependencies.contains(&"service"), "{dependencies:?}");
    for below in ["repository", "client", "taskgroup", "lanes"] {
        assert!(
            !dependencies.contains(&below),
            "api depends on {below} directly: {dependencies:?}"
        );
    }
}
