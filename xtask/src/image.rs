//! `cargo xtask image [--run | --test]`: the service's container image, built on this machine
//! with podman `FROM scratch` (no base image can be pulled here), and the check that it serves.
//!
//! The image holds the `api` binary, the shared libraries and loader `ldd` names, `config/`,
//! `migrations/` and its user in `/etc/passwd`, staged under `target/image/` for
//! `deploy/container/Containerfile`; podman reads the `containers.conf` xtask writes under
//! `target/podman/`. Containers run as the Kubernetes manifests run them and are removed
//! afterwards, even on failure or Ctrl-C, or by the next run if this one is killed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Args;
use tokio::process::Command;
use xtask::pg::{Cluster, State};
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

const IMAGE: &str = "localhost/dashboard-api";
const CONTAINERS_CONF: &str = "target/podman/containers.conf";
/// This sandbox refuses the host's default ulimits; crun and systemd's cgroups fail here.
const CONF: &str = "[containers]\ndefault_ulimits = []\n\n\
                    [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n";
/// `USER` in the Containerfile, `runAsUser` in the manifests.
const APP_UID: u32 = 10001;
/// The pid of the xtask that started a container: a later run removes it once that has exited.
const OWNER_LABEL: &str = "io.dashboard.xtask.owner";
/// The bound on a podman command that looks something up or removes it.
const SHORT: Duration = Duration::from_secs(30);
/// Seconds from SIGTERM to SIGKILL: `server.shutdown_grace` (10 s) and slack, as in the manifests.
const STOP_GRACE: u64 = 15;

/// Runs `cargo xtask image`. Ctrl-C stops it; the containers it started are removed.
pub async fn run(args: ImageArgs) -> Result<()> {
    if args.test {
        return test_alone().await;
    }
    contained(async {
        let started = Instant::now();
        stack::build_release(&["api", "upstream"][..if args.run { 2 } else { 1 }]).await?;
        let (compiled, started) = (started.elapsed().as_secs_f64(), Instant::now());
        let version = api_version(stack::RELEASE_API).await?;
        let tags = [format!("{IMAGE}:{version}"), format!("{IMAGE}:latest")];
        let (id, mb) = build(stack::RELEASE_API, &version, &tags).await?;
        let (tags_shown, id) = (tags.join(", "), id.get(..12).unwrap_or(&id));
        let took = started.elapsed().as_secs_f64();
        print!("==> image {tags_shown} ({id}), {mb:.1} MB; ");
        println!("cargo build {compiled:.1} s, image build {took:.1} s");
        if args.run {
            run_on_dev_database(&tags[0], args.user).await?;
        }
        Ok(())
    })
    .await
}

/// `--test`: [`test`] on a throwaway cluster laid out as `cargo xtask test`'s (locked while in
/// use), so that the next test run removes it if this one is killed.
async fn test_alone() -> Result<()> {
    let mut cargo = Command::new(stack::cargo());
    cargo.args(["build", "--package", "api", "--package", "upstream"]);
    ensure!(cargo.status().await?.success(), "cargo build failed");
    let dir = PathBuf::from(format!("target/pg/test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {dir:?}"))?;
    let lock = std::fs::File::create(dir.join("lock")).context("cannot create the lock file")?;
    lock.try_lock()?;
    let cluster = Cluster::throwaway(&dir, free_port()?)?;
    let result = match cluster.start().await {
        Ok(()) => test(&cluster).await,
        failed => failed,
    };
    if let Err(e) = cluster.remove_all() {
        eprintln!("warning: could not remove the throwaway cluster: {e:#}");
    }
    result
}

/// The last step of `cargo xtask test`: the image of the debug `api` it built, on a fresh database
/// of `cluster`. `api migrate` runs twice (the second must find nothing to do, as when a deploy
/// Job is re-run), then it serves a dashboard as a non-root user and stops cleanly on SIGTERM.
///
/// # Errors
///
/// When podman is missing or fails, or any of those checks fails.
pub async fn test(cluster: &Cluster) -> Result<()> {
    let started = Instant::now();
    let tag = format!("{IMAGE}:test-{}", std::process::id());
    let checked = contained(async {
        let (_, mb) = build("target/debug/api", "test", std::slice::from_ref(&tag)).await?;
        let took = started.elapsed().as_secs_f64();
        eprintln!("image: built {tag} from the debug binary, {mb:.1} MB, in {took:.1} s");
        cluster.create_database("image", None)?;
        let url = cluster.url("image")?;
        let migrate = || start(&tag, "migrate", &url, "");
        let (applied, again) = (migrate().await?, migrate().await?);
        if !applied.contains("migration(s) applied") || !again.contains("up to date") {
            bail!("`api migrate` twice, on an empty database, printed:\n{applied}{again}");
        }
        eprintln!("image: `api migrate` applied the schema, and a second run found it up to date");
        xtask::seed::seed(&url, 100, false).context("cannot seed the image's database")?;
        serve_and_check(&tag, &url, "target/debug/upstream", 42).await
    })
    .await;
    // Every run builds a test image of its own: keep the store from filling up with them.
    let _ = bounded(&mut podman(["rmi", "--force", &tag]), SHORT).await;
    checked?;
    let took = started.elapsed().as_secs_f64();
    eprintln!("image: passed in {took:.1} s (build, migrate, serve, stop)");
    Ok(())
}

/// `--run`: the image on the development database, as `cargo xtask up` prepares it.
async fn run_on_dev_database(image: &str, user: u64) -> Result<()> {
    let settings = xtask::settings::Settings::load()?;
    let (cluster, database) = xtask::pg::dev_cluster(&settings)?;
    let was_running = cluster.state()? == State::Running;
    xtask::pg::start(&cluster, &database).await?;
    let result = async {
        let url = settings.database.url_with_password()?;
        let migrated = start(image, "migrate", &url, "").await?;
        println!("==> api migrate (in the image): {}", migrated.trim());
        // Seeds the development data when the database has none, as `cargo xtask up` does.
        stack::prepare_database(Path::new(stack::RELEASE_API), &url, 100_000).await?;
        serve_and_check(image, &url, "target/release/upstream", user).await
    };
    let result = result.await;
    if !was_running {
        cluster.stop()?;
        println!("PostgreSQL stopped (it was not running before)");
    }
    result
}

/// Writes [`CONF`], then runs `work` until it ends or Ctrl-C, removing the containers of this
/// process and of killed runs before and after.
async fn contained(work: impl Future<Output = Result<()>>) -> Result<()> {
    if std::fs::read_to_string(CONTAINERS_CONF).ok().as_deref() != Some(CONF) {
        std::fs::create_dir_all("target/podman").context("cannot create target/podman")?;
        std::fs::write(CONTAINERS_CONF, CONF).context("cannot write containers.conf")?;
    }
    remove_containers().await;
    let result = tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    remove_containers().await;
    result
}

/// Removes the containers labelled with [`OWNER_LABEL`] whose owner is this process or is gone.
async fn remove_containers() {
    let filter = format!("label={OWNER_LABEL}");
    let format = format!("{{{{.ID}}}} {{{{index .Labels \"{OWNER_LABEL}\"}}}}");
    let mut list = podman(["ps", "--all", "--filter", &filter, "--format", &format]);
    let list = bounded(&mut list, SHORT).await.unwrap_or_default();
    let mut rm = vec!["rm", "--force", "--time", "0"];
    for (id, owner) in list.lines().filter_map(|line| line.split_once(' ')) {
        if owner.parse() == Ok(std::process::id()) || !Path::new("/proc").join(owner).exists() {
            rm.push(id);
        }
    }
    if rm.len() > 4 {
        let _ = bounded(&mut podman(rm), SHORT).await;
    }
}

/// Builds the image of `binary` with `tags`: its id and size in MB. Untagged older builds go.
async fn build(binary: &str, version: &str, tags: &[String]) -> Result<(String, f64)> {
    let context = format!("target/image/{}", tags[0].replace([':', '/'], "-"));
    let args = format!(
        "build --quiet --file deploy/container/Containerfile --build-arg VERSION={version} \
         --tag {} {context}",
        tags.join(" --tag ")
    );
    stage(binary, Path::new(&context)).await?;
    let built = bounded(&mut podman(args.split(' ')), Duration::from_secs(300)).await;
    let _ = std::fs::remove_dir_all(&context);
    let id = built?.trim().to_owned();
    let prune = "image prune --force --filter label=org.opencontainers.image.title=dashboard-api";
    bounded(&mut podman(prune.split(' ')), SHORT).await?;
    let inspect = ["image", "inspect", "--format", "{{.Size}}", &id];
    let size = bounded(&mut podman(inspect), SHORT).await?;
    Ok((id, size.trim().parse::<f64>()? / 1e6))
}

/// Lays out `context` afresh: `system/` (loader, libraries, `/etc`) and `app/` (binary without
/// debug information, `config/`, `migrations/`), two layers: a new binary leaves the first alone.
async fn stage(binary: &str, context: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(context);
    let (system, app) = (context.join("system"), context.join("app"));
    let mut copies = Vec::new();
    for library in parse_ldd(&bounded(Command::new("ldd").arg(binary), SHORT).await?)? {
        copies.push((system.join(library.strip_prefix("/")?), library));
    }
    for (dir, extension) in [("config", "toml"), ("migrations", "sql")] {
        for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {dir}"))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == extension) {
                copies.push((app.join(&path), path));
            }
        }
    }
    // A symbolic link's target is copied under the link's name, which is what the loader seeks.
    for (to, from) in copies {
        std::fs::create_dir_all(to.parent().context("no parent")?)?;
        std::fs::copy(&from, &to).with_context(|| format!("cannot copy {from:?}"))?;
    }
    let etc = system.join("etc");
    std::fs::create_dir_all(&etc)?;
    let user = format!("dashboard:x:{APP_UID}:{APP_UID}:dashboard API:/app:/nonexistent\n");
    std::fs::write(etc.join("passwd"), user)?;
    std::fs::write(etc.join("group"), format!("dashboard:x:{APP_UID}:\n"))?;
    // Without it glibc asks DNS before /etc/hosts.
    std::fs::write(etc.join("nsswitch.conf"), "hosts: files dns\n")?;
    let mut strip = Command::new("objcopy");
    strip.args(["--strip-debug", binary]).arg(app.join("api"));
    bounded(&mut strip, Duration::from_secs(120)).await?;
    Ok(())
}

/// The paths in `ldd` output: the libraries (`libc.so.6 => /lib/…/libc.so.6 (0x…)`) and the
/// loader (`/lib64/ld-linux-x86-64.so.2 (0x…)`); the kernel's vDSO has no file.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in text.lines() {
        if let Some((name, _)) = line.split_once("=> not found") {
            bail!("the binary links {}, which is not installed", name.trim());
        }
        paths.extend(line.split_whitespace().filter(|word| word.starts_with('/')));
    }
    Ok(paths.into_iter().map(PathBuf::from).collect())
}

/// The version `binary --version` prints (`api 0.1.0` gives `0.1.0`).
async fn api_version(binary: &str) -> Result<String> {
    let text = bounded(Command::new(binary).arg("--version"), SHORT).await?;
    let version = text.split_whitespace().nth(1).map(str::to_owned);
    version.with_context(|| format!("unexpected answer from {binary} --version: {text:?}"))
}

/// Runs `api <cmd>` (`serve` detached; else to its end, returning what it printed) restricted as
/// the Deployment restricts the pod (with no tmpfs on /tmp, like Kubernetes). The database URL
/// reaches podman in its environment, so that no password shows in a process list.
async fn start(image: &str, cmd: &str, url: &str, options: &str) -> Result<String> {
    let pid = std::process::id();
    let mode = if cmd == "serve" { "--detach" } else { "--rm" };
    let args = format!(
        "run --name dashboard-{cmd}-{pid} --label {OWNER_LABEL}={pid} {mode} --pull never \
         --network host --read-only --read-only-tmpfs=false --cap-drop ALL \
         --security-opt no-new-privileges --env DATABASE_URL {options} {image} {cmd}"
    );
    let mut podman = podman(args.split_whitespace());
    podman.env("DATABASE_URL", url);
    bounded(&mut podman, Duration::from_secs(120)).await
}

/// Serves `image` with the stand-in `upstream`, checks it (its log shown on failure), stops it.
async fn serve_and_check(image: &str, url: &str, upstream: &str, user: u64) -> Result<()> {
    let upstream = Upstream::start(upstream, free_port()?, &[]).await?;
    let (port, upstream_url) = (free_port()?, &upstream.base_url);
    let options = format!(
        "--env APP__SERVER__PORT={port} --env APP__SERVER__WORKERS=2 \
         --env APP__RECOMMENDATIONS__BASE_URL={upstream_url}"
    );
    start(image, "serve", url, &options).await?;
    let name = format!("dashboard-serve-{}", std::process::id());
    if let Err(e) = check_serving(&name, &format!("127.0.0.1:{port}"), user).await {
        let _ = tokio::time::timeout(SHORT, podman(["logs", &name]).status()).await;
        return Err(e);
    }
    let stopping = Instant::now();
    let stop = ["stop", "--time", &STOP_GRACE.to_string(), &name];
    bounded(&mut podman(stop), Duration::from_secs(STOP_GRACE) + SHORT).await?;
    let took = stopping.elapsed().as_secs_f64();
    let code = state(&name, "ExitCode").await?;
    bounded(&mut podman(["rm", &name]), SHORT).await?;
    ensure!(code == "0", "the API exited with {code} on SIGTERM");
    println!("==> stopped with SIGTERM in {took:.1} s, exit code 0; container removed");
    Ok(())
}

async fn check_serving(name: &str, address: &str, user: u64) -> Result<()> {
    let started = Instant::now();
    while !stack::answers_200(address, "/readyz").await {
        if state(name, "Running").await? != "true" {
            bail!("the container exited before it was ready; its log is above");
        } else if started.elapsed() > Duration::from_secs(60) {
            bail!("the container did not answer /readyz with 200 within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ready = started.elapsed().as_secs_f64();
    println!("==> serving on http://{address} ({name} on the host network), ready in {ready:.1} s");
    for path in ["/healthz", "/readyz"] {
        ensure!(stack::answers_200(address, path).await, "{path}: not 200");
        println!("GET {path} -> 200");
    }
    let path = format!("/api/users/{user}/dashboard");
    let body = get(address, &path).await?;
    let profile = format!("\"profile\":{{\"id\":{user},");
    // `errors` lists the sources that failed inside the container (the database, the stand-in).
    let whole = [r#""status":"success""#, &profile, r#""errors":[]"#];
    if !whole.iter().all(|part| body.contains(part)) {
        bail!("GET {path} answered 200 without user {user}'s whole dashboard: {body}");
    }
    let bytes = body.len();
    println!("GET {path} -> 200, user {user}'s dashboard ({bytes} bytes, no source failed)");
    let pid = state(name, "Pid").await?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let uids = format!("Uid:\t{APP_UID}\t{APP_UID}\t{APP_UID}\t{APP_UID}\n");
    if !status.contains(&uids) || !status.contains("CapEff:\t0000000000000000\n") {
        bail!("the API is not uid {APP_UID} without capabilities: /proc/{pid}/status:\n{status}");
    }
    print!("the container's process (host pid {pid}) ");
    println!("runs as uid {APP_UID}, without capabilities");
    Ok(())
}

async fn state(name: &str, field: &str) -> Result<String> {
    let format = format!("{{{{.State.{field}}}}}");
    let value = bounded(&mut podman(["inspect", "--format", &format, name]), SHORT).await?;
    Ok(value.trim().to_owned())
}

/// The body of `GET path` on `address`, which must answer 200 within 10 s.
async fn get(address: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(address).await?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.map(|_| response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange).await;
    let response = response.with_context(|| format!("GET {path}: no answer in 10 s"))??;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {response}");
    Ok(body.to_owned())
}

/// podman with this project's `containers.conf` (written by [`contained`]) and runtime.
fn podman<T: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = T>) -> Command {
    let conf = std::path::absolute(CONTAINERS_CONF).unwrap_or_default();
    let mut podman = Command::new("podman");
    podman.env("CONTAINERS_CONF", conf);
    podman.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    podman.args(args).kill_on_drop(true);
    podman
}

/// Runs `command`, killing it after `limit`; returns its standard output, or an error with its
/// standard error. The error shows the program and its arguments, never its environment.
async fn bounded(command: &mut Command, limit: Duration) -> Result<String> {
    let (program, args) = (command.as_std().get_program(), command.as_std().get_args());
    let shown = format!("{program:?} {:?}", args.collect::<Vec<_>>());
    let output = command.stdin(Stdio::null()).kill_on_drop(true).output();
    let output = tokio::time::timeout(limit, output).await;
    let output = output.with_context(|| format!("{shown} did not finish within {limit:?}"))?;
    let output = output.with_context(|| format!("cannot run {shown}"))?;
    let error = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "{shown}: {}", error.trim());
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader_and_a_missing_library_is_an_error() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibc.so.6 => /lib/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        let paths = ["/lib/libc.so.6", "/lib64/ld-linux-x86-64.so.2"].map(super::PathBuf::from);
        assert_eq!(super::parse_ldd(text).unwrap(), paths);
        let error = super::parse_ldd("\tlibpq.so.5 => not found\n").unwrap_err();
        assert!(error.to_string().contains("libpq.so.5"), "{error}");
    }
}
