//! `cargo xtask image [--run | --test]`: the service's container image, built on this machine
//! with podman `FROM scratch` (no base image can be pulled here), and the check that it serves.
//!
//! The image holds only what the `api` binary needs at run time: the binary, the shared libraries
//! `ldd` says it links (at the paths it reports) with the dynamic loader, `config/` (the defaults
//! the environment overrides), `migrations/` (read by `api migrate` when a deploy runs it), and an
//! `/etc/passwd` naming the unprivileged user it runs as. xtask stages those under
//! `target/image/<tag>/` and podman builds `deploy/container/Containerfile` on that context.
//!
//! Debian's podman on this kind of machine needs a `containers.conf` without default ulimits and
//! with runc and cgroupfs; xtask writes one under `target/podman/` and points `CONTAINERS_CONF` at
//! it, so nothing under `/etc` changes. Every container it starts is run the way the Kubernetes
//! manifests run it (read-only root, no capabilities, no privilege escalation) and is removed
//! afterwards, also on failure or Ctrl-C; one left by a killed run is removed by the next.
//!
//! `cargo xtask test` runs [`test`]: the image built from the test run's debug binary, migrating a
//! fresh database of the test cluster and serving a dashboard from it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use tokio::process::Command;

use xtask::pg::{Cluster, State};
use xtask::settings::Settings;
use xtask::stack::{self, Upstream, free_port};

/// Arguments of `cargo xtask image`.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Then run the image against the local development database (started, migrated from the
    /// image and seeded if needed) and the stand-in recommendation service, check that it serves
    /// a dashboard as a non-root user, and stop it.
    #[arg(long)]
    run: bool,
    /// The user whose dashboard `--run` asks for.
    #[arg(long, default_value_t = 42, requires = "run")]
    user: u64,
    /// Instead, run only the image step of `cargo xtask test` (the image of the debug build,
    /// migrating and serving on a throwaway cluster): quicker while working on the image.
    #[arg(long, conflicts_with = "run")]
    test: bool,
}

/// The image's name; tags are the API's version and `latest`.
const IMAGE: &str = "localhost/dashboard-api";
/// The build recipe, on the context that [`stage`] makes.
const CONTAINERFILE: &str = "deploy/container/Containerfile";
/// Where the staged build contexts go, one directory per tag.
const STAGING: &str = "target/image";
/// The containers.conf that podman reads (see the module's documentation).
const CONTAINERS_CONF: &str = "target/podman/containers.conf";
/// The uid and gid the image runs as: `USER` in the Containerfile and `runAsUser` in the
/// manifests say the same.
const APP_UID: u32 = 10001;
/// The label on every container xtask starts: the process id of the xtask that started it, so
/// that a later run can remove those whose owner is gone.
const OWNER_LABEL: &str = "io.dashboard.xtask.owner";
/// The release binary of the stand-in recommendation service.
const RELEASE_UPSTREAM: &str = "target/release/upstream";
/// The debug binaries the test run has just built.
const DEBUG_API: &str = "target/debug/api";
const DEBUG_UPSTREAM: &str = "target/debug/upstream";
/// Users seeded into the test database: enough for the dashboard asked for.
const TEST_USERS: u32 = 100;
/// How long a container may take from start to answering `/readyz`.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// What `podman stop` gives the API after SIGTERM before it kills it: the default
/// `server.shutdown_grace` (10 s) and some slack, as `terminationGracePeriodSeconds` does.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Runs `cargo xtask image`. Ctrl-C stops it; the containers it started are removed.
pub async fn run(args: ImageArgs) -> Result<()> {
    if args.test {
        return test_alone().await;
    }
    tokio::select! {
        result = build_and_check(&args) => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}

/// `--test`: [`test`] on a throwaway cluster of its own, laid out as `cargo xtask test` lays out
/// its own (`target/pg/test-<pid>`, held by a lock file), so that a run killed before it could
/// remove it is cleaned up by the next `cargo xtask test`.
async fn test_alone() -> Result<()> {
    /// Stops and deletes the cluster when dropped, whatever happened; the lock is held until
    /// then.
    struct Throwaway(
        Cluster,
        #[expect(dead_code, reason = "held, not read")] std::fs::File,
    );
    impl Drop for Throwaway {
        fn drop(&mut self) {
            if let Err(e) = self.0.remove_all() {
                eprintln!("warning: could not remove the throwaway cluster: {e:#}");
            }
        }
    }
    // The debug binaries `cargo xtask test` would have built (a no-op when they are current).
    let built = Command::new(stack::cargo())
        .args(["build", "--package", "api", "--package", "upstream"])
        .kill_on_drop(true)
        .status()
        .await
        .context("cannot run cargo build")?;
    ensure!(built.success(), "building api and upstream failed");
    let dir = PathBuf::from(format!("target/pg/test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let lock = std::fs::File::create(dir.join("lock")).context("cannot create the lock file")?;
    lock.try_lock()
        .map_err(|e| anyhow::anyhow!("cannot lock {}: {e}", dir.display()))?;
    let port = free_port()?;
    let cluster = Throwaway(Cluster::throwaway(&dir, port)?, lock);
    cluster.0.start().await?;
    test(&cluster.0).await
}

async fn build_and_check(args: &ImageArgs) -> Result<()> {
    let packages: &[&str] = if args.run {
        &["api", "upstream"]
    } else {
        &["api"]
    };
    let started = Instant::now();
    stack::build_release(packages).await?;
    let compiled = started.elapsed();
    let version = api_version(stack::RELEASE_API).await?;
    let tags = [format!("{IMAGE}:{version}"), format!("{IMAGE}:latest")];
    let built = Instant::now();
    let image = build(Path::new(stack::RELEASE_API), &tags, false, false).await?;
    println!(
        "==> image {} ({}), {:.1} MB; cargo build {:.1} s, image build {:.1} s",
        tags.join(", "),
        short_id(&image.id),
        megabytes(image.size),
        compiled.as_secs_f64(),
        built.elapsed().as_secs_f64()
    );
    if args.run {
        run_on_dev_database(&tags[0], args.user).await?;
    }
    Ok(())
}

/// The image, run against the test run's cluster: the step of `cargo xtask test` after the
/// test binaries and schemathesis. It uses the debug `api` that run has just built (staged the
/// same way, its debug information stripped), so CI compiles nothing more for it; the release
/// build that `cargo xtask image` makes differs only in the compiler's optimisations.
///
/// On a fresh database of `cluster` it runs the image's `api migrate` (twice: the second must
/// find nothing to do, as a re-run deploy Job does), seeds a few users, serves, and requires a
/// dashboard, `/readyz`, a non-root process without capabilities and a clean stop on SIGTERM.
///
/// # Errors
///
/// When podman is missing or fails, or any of those checks fails.
pub async fn test(cluster: &Cluster) -> Result<()> {
    tokio::select! {
        result = test_on(cluster) => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}

async fn test_on(cluster: &Cluster) -> Result<()> {
    let started = Instant::now();
    let tag = format!("{IMAGE}:test-{}", std::process::id());
    let image = build(Path::new(DEBUG_API), std::slice::from_ref(&tag), true, true).await?;
    eprintln!(
        "image: built {tag} from the debug binary, {:.1} MB, in {:.1} s",
        megabytes(image.size),
        started.elapsed().as_secs_f64()
    );
    let checked = check_on_test_cluster(cluster, &tag).await;
    // The test image is rebuilt by every run: keep the store from filling up with them.
    if let Err(e) = podman_output(&["rmi", "--force", &tag], Duration::from_secs(30)).await {
        eprintln!("warning: could not remove {tag}: {e:#}");
    }
    let context = Path::new(STAGING).join(tag_dir(&tag));
    let _ = std::fs::remove_dir_all(context);
    checked?;
    eprintln!(
        "image: passed in {:.1} s (build, migrate, serve, stop)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn check_on_test_cluster(cluster: &Cluster, tag: &str) -> Result<()> {
    const DATABASE: &str = "image";
    cluster.create_database(DATABASE, None)?;
    let url = cluster.url(DATABASE)?;
    let env = vec![("DATABASE_URL".to_owned(), url.clone())];
    let applied = migrate(tag, &env).await?;
    ensure!(
        applied.contains("migration(s) applied"),
        "the image's `api migrate` applied nothing to an empty database: {applied}"
    );
    let again = migrate(tag, &env).await?;
    ensure!(
        again.contains("up to date"),
        "a second `api migrate` was not a no-op: {again}"
    );
    eprintln!("image: `api migrate` applied the schema, and a second run found it up to date");
    xtask::seed::seed(&url, TEST_USERS, false).context("cannot seed the image's database")?;
    let upstream = Upstream::start(DEBUG_UPSTREAM, free_port()?, &[])
        .await
        .context("cannot start the stand-in recommendation service")?;
    let checked = serve_and_check(tag, env, &upstream.base_url, 42).await;
    upstream.stop().await;
    checked
}

/// `--run`: the image on the development database, as `cargo xtask up` prepares it.
async fn run_on_dev_database(image: &str, user: u64) -> Result<()> {
    let settings = Settings::load()?;
    let (cluster, database) = xtask::pg::dev_cluster(&settings)?;
    let was_running = cluster.state()? == State::Running;
    xtask::pg::start(&cluster, &database).await?;
    let result = run_on(&settings, image, user).await;
    if !was_running {
        match cluster.stop() {
            Ok(_) => println!("PostgreSQL stopped (it was not running before)"),
            Err(e) => eprintln!("warning: could not stop PostgreSQL: {e:#}"),
        }
    }
    result
}

async fn run_on(settings: &Settings, image: &str, user: u64) -> Result<()> {
    let url = settings.database.url_with_password()?;
    let env = vec![("DATABASE_URL".to_owned(), url.clone())];
    let migrated = migrate(image, &env).await?;
    println!("==> api migrate (in the image): {}", migrated.trim());
    // Seeds the development data when the database has none, as `cargo xtask up` does.
    stack::prepare_database(Path::new(stack::RELEASE_API), &url, 100_000).await?;
    let upstream = Upstream::start(RELEASE_UPSTREAM, free_port()?, &[])
        .await
        .context("cannot start the stand-in recommendation service")?;
    let checked = serve_and_check(image, env, &upstream.base_url, user).await;
    upstream.stop().await;
    checked
}

/// Runs `image` on the host's network with `env`, checks that it serves `user`'s dashboard and
/// runs as the unprivileged user, then stops it with SIGTERM and requires a clean exit.
async fn serve_and_check(
    image: &str,
    mut env: Vec<(String, String)>,
    upstream: &str,
    user: u64,
) -> Result<()> {
    let port = free_port()?;
    env.push(("APP__SERVER__PORT".to_owned(), port.to_string()));
    env.push((
        "APP__RECOMMENDATIONS__BASE_URL".to_owned(),
        upstream.to_owned(),
    ));
    env.push(("APP__SERVER__WORKERS".to_owned(), "2".to_owned()));
    let container = Container::start(image, "serve", &env, &["serve"]).await?;
    let address = format!("127.0.0.1:{port}");
    if let Err(e) = check_serving(&container, &address, user).await {
        eprintln!("{}", container.logs().await);
        return Err(e);
    }
    let (code, took) = container.stop().await?;
    ensure!(
        code == 0,
        "the API exited with {code} on SIGTERM (a clean shutdown exits with 0)"
    );
    println!(
        "==> stopped with SIGTERM in {:.1} s, exit code 0; container removed",
        took.as_secs_f64()
    );
    Ok(())
}

async fn check_serving(container: &Container, address: &str, user: u64) -> Result<()> {
    let started = Instant::now();
    loop {
        if stack::answers_200(address, "/readyz").await {
            break;
        }
        if !container.running().await? {
            bail!("the container exited before it was ready; its log follows");
        }
        if started.elapsed() > READY_WITHIN {
            bail!(
                "the container did not answer /readyz with 200 within {}s",
                READY_WITHIN.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "==> serving on http://{address} ({} on the host network), ready in {:.1} s",
        container.name,
        started.elapsed().as_secs_f64()
    );
    for path in ["/healthz", "/readyz"] {
        let (status, _) = http_get(address, path).await?;
        ensure!(status == 200, "GET {path} answered {status}");
        println!("GET {path} -> {status}");
    }
    let path = format!("/api/users/{user}/dashboard");
    let (status, body) = http_get(address, &path).await?;
    ensure!(status == 200, "GET {path} answered {status}: {body}");
    let profile = format!("\"profile\":{{\"id\":{user},");
    ensure!(
        body.contains("\"status\":\"success\"") && body.contains(&profile),
        "GET {path} answered 200 without user {user}'s dashboard: {body}"
    );
    ensure!(
        body.contains("\"errors\":[]"),
        "GET {path}: a source failed inside the container: {body}"
    );
    println!(
        "GET {path} -> {status}, user {user}'s dashboard ({} bytes, no source failed)",
        body.len()
    );
    let process = container.process().await?;
    ensure!(
        process.uids.iter().all(|&uid| uid == APP_UID),
        "the API runs with uids {:?}, not {APP_UID}",
        process.uids
    );
    ensure!(
        process.effective_caps == 0,
        "the API holds capabilities {:#x}",
        process.effective_caps
    );
    println!(
        "the container's process (host pid {}) runs as uid {APP_UID}, without capabilities",
        process.pid
    );
    Ok(())
}

/// Runs the image's `api migrate` with `env` and returns what it printed.
async fn migrate(image: &str, env: &[(String, String)]) -> Result<String> {
    let container = Container::start(image, "migrate", env, &["migrate"]).await?;
    let code = container.wait(Duration::from_secs(120)).await?;
    let logs = container.logs().await;
    container.remove().await;
    ensure!(
        code == 0,
        "`api migrate` in the image exited with {code}: {logs}"
    );
    Ok(logs)
}

/// What `cargo xtask image` built.
struct Built {
    id: String,
    /// Uncompressed, in bytes.
    size: u64,
}

/// Stages `binary` with what it needs and builds the image with `tags`. `strip` drops the
/// binary's debug information (a debug build's is most of its size); `quiet` hides podman's steps.
async fn build(binary: &Path, tags: &[String], strip: bool, quiet: bool) -> Result<Built> {
    ensure!(!tags.is_empty(), "an image needs at least one tag");
    let version = api_version(&binary.to_string_lossy()).await?;
    let context = Path::new(STAGING).join(tag_dir(&tags[0]));
    stage(binary, &context, strip).await?;
    let previous = image_id(&tags[0]).await;
    let mut args = vec![
        "build".to_owned(),
        "--file".to_owned(),
        CONTAINERFILE.to_owned(),
        "--build-arg".to_owned(),
        format!("VERSION={version}"),
    ];
    if quiet {
        args.push("--quiet".to_owned());
    }
    for tag in tags {
        args.push("--tag".to_owned());
        args.push(tag.clone());
    }
    args.push(context.to_string_lossy().into_owned());
    let mut command = podman()?;
    command.args(&args);
    if quiet {
        command.stdout(Stdio::null());
    }
    let status = tokio::time::timeout(Duration::from_secs(300), command.status())
        .await
        .context("podman build did not finish within 300 s")?
        .context("cannot run podman (install Debian's podman and runc)")?;
    ensure!(status.success(), "podman build failed ({status})");
    let id = image_id(&tags[0])
        .await
        .with_context(|| format!("podman built no image {}", tags[0]))?;
    // A rebuild moves the tags to the new image; the old one, if nothing else names it, is
    // only taking space.
    if let Some(old) = previous.filter(|old| *old != id) {
        let _ = podman_output(&["rmi", &old], Duration::from_secs(30)).await;
    }
    let size = podman_output(
        &["image", "inspect", "--format", "{{.Size}}", &id],
        Duration::from_secs(30),
    )
    .await?;
    let size = size
        .trim()
        .parse()
        .with_context(|| format!("unexpected image size from podman: {size:?}"))?;
    Ok(Built { id, size })
}

/// The id of the image tagged `tag`, if there is one.
async fn image_id(tag: &str) -> Option<String> {
    podman_output(
        &["image", "inspect", "--format", "{{.Id}}", tag],
        Duration::from_secs(30),
    )
    .await
    .ok()
    .map(|id| id.trim().to_owned())
}

/// Lays out the build context in `context` (emptied first): `system/` (the loader, the shared
/// libraries, `/etc`) and `app/` (the binary, `config/`, `migrations/`), the two layers of the
/// image, so that a new binary leaves the libraries' layer as it was.
async fn stage(binary: &Path, context: &Path, strip: bool) -> Result<()> {
    if context.exists() {
        std::fs::remove_dir_all(context)
            .with_context(|| format!("cannot empty {}", context.display()))?;
    }
    let system = context.join("system");
    let app = context.join("app");
    for dir in [&system.join("etc"), &app] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    for library in linked_libraries(binary).await? {
        let relative = library
            .strip_prefix("/")
            .with_context(|| format!("ldd reported a relative path {}", library.display()))?;
        let target = system.join(relative);
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        // Copies what a symbolic link points at, under the link's own name: the name is what
        // the binary and the loader look for.
        std::fs::copy(&library, &target)
            .with_context(|| format!("cannot copy {}", library.display()))?;
    }
    let account = format!("dashboard:x:{APP_UID}:{APP_UID}:dashboard API:/app:/nonexistent\n");
    let files = [
        ("etc/passwd", account),
        ("etc/group", format!("dashboard:x:{APP_UID}:\n")),
        // Without this file glibc asks DNS before /etc/hosts; a container has both.
        ("etc/nsswitch.conf", "hosts: files dns\n".to_owned()),
    ];
    for (path, text) in files {
        std::fs::write(system.join(path), text).with_context(|| format!("cannot write {path}"))?;
    }
    let target = app.join("api");
    if strip {
        let output = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(binary)
            .arg(&target)
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(120), output)
            .await
            .context("objcopy did not finish within 120 s")?
            .context("cannot run objcopy (Debian's binutils)")?;
        ensure!(
            output.status.success(),
            "objcopy --strip-debug failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    } else {
        std::fs::copy(binary, &target)
            .with_context(|| format!("cannot copy {}", binary.display()))?;
    }
    // Only what the binary reads at run time: the default settings and the migrations.
    copy_files(Path::new("config"), &app.join("config"), "toml")?;
    copy_files(Path::new("migrations"), &app.join("migrations"), "sql")?;
    Ok(())
}

/// Copies the files of `from` ending in `.extension` into `to`.
fn copy_files(from: &Path, to: &Path, extension: &str) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    let entries =
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?;
    let mut copied = 0;
    for entry in entries {
        let path = entry?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == extension) {
            let name = path.file_name().context("a file without a name")?;
            std::fs::copy(&path, to.join(name))
                .with_context(|| format!("cannot copy {}", path.display()))?;
            copied += 1;
        }
    }
    ensure!(copied > 0, "no .{extension} files in {}", from.display());
    Ok(())
}

/// The absolute paths of the shared objects `binary` loads, the dynamic loader included, as
/// `ldd` reports them.
async fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(binary).kill_on_drop(true).output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .context("ldd did not finish within 30 s")?
        .context("cannot run ldd")?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "ldd {} failed: {text}{}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let libraries = parse_ldd(&text)?;
    ensure!(
        !libraries.is_empty(),
        "ldd found no dynamic loader for {}",
        binary.display()
    );
    Ok(libraries)
}

/// The paths in `ldd` output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and the
/// loader's `/lib64/ld-linux-x86-64.so.2 (0x…)`; the kernel's vDSO has no file and is skipped.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let location = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("the binary links {}, which is not installed", name.trim());
                }
                rest
            }
            None => line,
        };
        let path = location.split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        }
    }
    Ok(paths)
}

/// The version `binary --version` prints (`api 0.1.0` gives `0.1.0`).
async fn api_version(binary: &str) -> Result<String> {
    let output = Command::new(binary)
        .arg("--version")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(10), output)
        .await
        .with_context(|| format!("{binary} --version did not finish within 10 s"))?
        .with_context(|| format!("cannot run {binary}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .nth(1)
        .filter(|_| output.status.success())
        .map(str::to_owned)
        .with_context(|| format!("unexpected answer from {binary} --version: {text:?}"))
}

/// A directory name for a tag's build context.
fn tag_dir(tag: &str) -> String {
    tag.rsplit('/')
        .next()
        .unwrap_or(tag)
        .replace([':', '/'], "-")
}

fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[expect(
    clippy::cast_precision_loss,
    reason = "an image's size, shown to one decimal"
)]
fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / 1_000_000.0
}

/// Writes the `containers.conf` podman needs here (once) and returns its path.
fn containers_conf() -> Result<&'static Path> {
    let path = Path::new(CONTAINERS_CONF);
    // The host's default ulimits cannot be applied inside this machine's sandbox; runc and
    // cgroupfs are what work here (crun and systemd's cgroups do not).
    let text = "[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = \"runc\"\n\
                cgroup_manager = \"cgroupfs\"\n";
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(path)
}

/// A podman command with this project's settings.
fn podman() -> Result<Command> {
    let conf = std::fs::canonicalize(containers_conf()?).context("cannot find containers.conf")?;
    let mut command = Command::new("podman");
    command
        .env("CONTAINERS_CONF", conf)
        .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    Ok(command)
}

/// Runs podman with `args`, within `limit`, and returns its standard output.
async fn podman_output(args: &[&str], limit: Duration) -> Result<String> {
    let output = podman()?.args(args).output();
    let output = tokio::time::timeout(limit, output)
        .await
        .with_context(|| format!("podman {} did not finish within {limit:?}", args[0]))?
        .context("cannot run podman (install Debian's podman and runc)")?;
    ensure!(
        output.status.success(),
        "podman {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The identity of a container's main process, from `/proc`.
struct Process {
    pid: u32,
    /// Real, effective, saved and filesystem uids.
    uids: Vec<u32>,
    /// The effective capability set.
    effective_caps: u64,
}

/// A container started by xtask, removed (forcibly) when this value is dropped without
/// [`Container::stop`] or [`Container::remove`].
struct Container {
    name: String,
    removed: bool,
}

impl Container {
    /// Starts `image` in the background with `args` after its entry point, on the host's
    /// network, with the restrictions the manifests put on the pod. `env` reaches podman through
    /// its own environment (`--env NAME`), so no password shows in a process list.
    async fn start(
        image: &str,
        role: &str,
        env: &[(String, String)],
        args: &[&str],
    ) -> Result<Self> {
        remove_orphans().await;
        let name = format!("dashboard-{role}-{}", std::process::id());
        let mut command = podman()?;
        command.args(["run", "--detach", "--name", &name]);
        command.args(["--label", &format!("{OWNER_LABEL}={}", std::process::id())]);
        command.args(["--pull", "never", "--network", "host"]);
        // As the Deployment runs it: readOnlyRootFilesystem (and, like Kubernetes, no tmpfs
        // on /tmp), drop ALL capabilities, allowPrivilegeEscalation: false.
        command.args([
            "--read-only",
            "--read-only-tmpfs=false",
            "--cap-drop",
            "ALL",
        ]);
        command.args(["--security-opt", "no-new-privileges"]);
        for (key, value) in env {
            command.args(["--env", key]).env(key, value);
        }
        command.arg(image).args(args);
        let output = tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .context("podman run did not finish within 60 s")?
            .context("cannot run podman (install Debian's podman and runc)")?;
        let container = Self {
            name,
            removed: false,
        };
        ensure!(
            output.status.success(),
            "podman run {image} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(container)
    }

    /// Whether its process still runs.
    async fn running(&self) -> Result<bool> {
        let state = self.inspect("{{.State.Running}}").await?;
        Ok(state.trim() == "true")
    }

    async fn inspect(&self, format: &str) -> Result<String> {
        podman_output(
            &["container", "inspect", "--format", format, &self.name],
            Duration::from_secs(30),
        )
        .await
    }

    /// Its main process as the host sees it.
    async fn process(&self) -> Result<Process> {
        let pid = self.inspect("{{.State.Pid}}").await?;
        let pid: u32 = pid
            .trim()
            .parse()
            .with_context(|| format!("unexpected pid from podman: {pid:?}"))?;
        let status_path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&status_path)
            .with_context(|| format!("cannot read {status_path}"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::trim)
                .with_context(|| format!("{status_path} has no {name}"))
        };
        let uids = field("Uid:")?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<Vec<u32>, _>>()
            .context("unexpected Uid line")?;
        let effective_caps =
            u64::from_str_radix(field("CapEff:")?, 16).context("unexpected CapEff line")?;
        Ok(Process {
            pid,
            uids,
            effective_caps,
        })
    }

    /// Waits at most `limit` for it to exit and returns its exit code.
    async fn wait(&self, limit: Duration) -> Result<i64> {
        let code = podman_output(&["wait", &self.name], limit)
            .await
            .with_context(|| format!("waiting for {} to exit", self.name))?;
        code.trim()
            .parse()
            .with_context(|| format!("unexpected exit code from podman: {code:?}"))
    }

    /// Its output so far (standard output and error), or why it cannot be read.
    async fn logs(&self) -> String {
        let output = match podman() {
            Ok(mut command) => command.args(["logs", &self.name]).output(),
            Err(e) => return format!("(no logs: {e:#})"),
        };
        match tokio::time::timeout(Duration::from_secs(30), output).await {
            Ok(Ok(output)) => format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
            Ok(Err(e)) => format!("(no logs: {e})"),
            Err(_) => "(no logs: podman logs did not finish within 30 s)".to_owned(),
        }
    }

    /// Stops it with SIGTERM (SIGKILL after [`STOP_GRACE`]), removes it, and returns its exit
    /// code and how long it took to stop.
    async fn stop(mut self) -> Result<(i64, Duration)> {
        let started = Instant::now();
        let grace = STOP_GRACE.as_secs().to_string();
        podman_output(
            &["stop", "--time", &grace, &self.name],
            STOP_GRACE + Duration::from_secs(15),
        )
        .await?;
        let took = started.elapsed();
        let code = self.inspect("{{.State.ExitCode}}").await?;
        let code = code
            .trim()
            .parse()
            .with_context(|| format!("unexpected exit code from podman: {code:?}"))?;
        podman_output(&["rm", &self.name], Duration::from_secs(30)).await?;
        self.removed = true;
        Ok((code, took))
    }

    /// Removes it, running or not.
    async fn remove(mut self) {
        if let Err(e) = podman_output(
            &["rm", "--force", "--time", "0", &self.name],
            Duration::from_secs(30),
        )
        .await
        {
            eprintln!("warning: could not remove container {}: {e:#}", self.name);
        }
        self.removed = true;
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if !self.removed {
            remove_now(&self.name);
        }
    }
}

/// Removes a container forcibly from synchronous code (a drop), waiting at most 20 s.
fn remove_now(name: &str) {
    let Ok(conf) = std::fs::canonicalize(CONTAINERS_CONF) else {
        return;
    };
    let child = std::process::Command::new("podman")
        .env("CONTAINERS_CONF", conf)
        .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
        .args(["rm", "--force", "--time", "0", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!("warning: could not remove container {name}");
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("warning: removing container {name} took over 20 s; it may be left");
}

/// Removes the containers of xtask runs that are gone (killed before they could clean up).
async fn remove_orphans() {
    let filter = format!("label={OWNER_LABEL}");
    let format = format!("{{{{.Names}}}} {{{{index .Labels \"{OWNER_LABEL}\"}}}}");
    let Ok(list) = podman_output(
        &["ps", "--all", "--filter", &filter, "--format", &format],
        Duration::from_secs(30),
    )
    .await
    else {
        return;
    };
    for line in list.lines() {
        let Some((name, owner)) = line.split_once(' ') else {
            continue;
        };
        let alive = owner
            .trim()
            .parse::<u32>()
            .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = podman_output(
                &["rm", "--force", "--time", "0", name],
                Duration::from_secs(30),
            )
            .await;
        }
    }
}

/// `GET path` on `address` over a fresh connection; the status code and the body (as sent:
/// chunked framing, if any, stays in it). At most 10 s.
async fn http_get(address: &str, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(address).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        tcp.take(4 << 20).read_to_end(&mut response).await?;
        std::io::Result::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET {path} on {address} got no answer within 10 s"))?
        .with_context(|| format!("GET {path} on {address} failed"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("GET {path}: not an HTTP response: {head:?}"))?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader_but_not_the_vdso() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        let paths = parse_ldd(text).unwrap();
        assert_eq!(
            paths,
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn a_library_that_is_not_installed_is_an_error() {
        let error = parse_ldd("\tlibpq.so.5 => not found\n").unwrap_err();
        assert!(error.to_string().contains("libpq.so.5"), "{error}");
    }

    #[test]
    fn tags_become_directory_names() {
        assert_eq!(
            tag_dir("localhost/dashboard-api:0.1.0"),
            "dashboard-api-0.1.0"
        );
        assert_eq!(
            tag_dir("localhost/dashboard-api:test-7"),
            "dashboard-api-test-7"
        );
    }
}
