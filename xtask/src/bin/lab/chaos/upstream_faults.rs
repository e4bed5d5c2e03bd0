//! Scenario `upstream-faults`: each fault mode of the stand-in recommendation service in turn
//! (hang, slow, 5xx, malformed JSON, oversized body declared and chunked, reset).
//!
//! Per mode: dashboards whose recommendations fail that way answer 200 with a `recommendations`
//! entry in `errors`, within the recommendations timeout; after `failure_threshold` (5) failures
//! the breaker opens (`recommendations_breaker_state` 2) and the next dashboards fail fast with
//! `circuit_open`; once the stand-in is healthy again and the cool-down (set to 1 s here) has
//! passed, the breaker closes (state 0) and dashboards are complete again.

use std::time::Duration;

use anyhow::Result;
use tokio::time::Instant;
use upstream::{Fault, Reply, StatusCode};

use super::Ctx;
use super::client::{self, Answer, json_string_after};
use super::report::sample;
use super::report::{ScenarioReport, ms};
use super::rig::Api;

/// Scheduling slack.
const SLACK: Duration = Duration::from_millis(300);
/// The breaker's cool-down in this scenario (the default, 10 s, would make it long).
const COOLDOWN: Duration = Duration::from_secs(1);
/// What "fails fast" means: no network wait at all, only the database reads.
const FAST: Duration = Duration::from_millis(250);

/// Runs the scenario.
pub async fn run(ctx: &Ctx, report: &mut ScenarioReport) -> Result<()> {
    report.title = "every stand-in fault mode: partial 200s within the timeout; the breaker opens, fails fast and closes";
    let cooldown = [(
        "APP__RECOMMENDATIONS__BREAKER__COOLDOWN",
        format!("{}ms", COOLDOWN.as_millis()),
    )];
    let (upstream, api) = ctx
        .stack(
            "upstream-faults",
            upstream::Config::default(),
            None,
            &cooldown,
        )
        .await?;
    let modes: [(&str, Reply, &str); 7] = [
        ("hang", Reply::fault(Fault::Hang), "timeout"),
        (
            "slow (1.5 s)",
            Reply::ok().after(Duration::from_millis(1500)),
            "timeout",
        ),
        (
            "5xx (500)",
            Reply::fault(Fault::Status(StatusCode::INTERNAL_SERVER_ERROR)),
            "status",
        ),
        ("malformed JSON", Reply::fault(Fault::Malformed), "decode"),
        (
            "oversized (declared)",
            Reply::fault(Fault::Oversized { declared: true }),
            "too_large",
        ),
        (
            "oversized (chunked)",
            Reply::fault(Fault::Oversized { declared: false }),
            "too_large",
        ),
        ("reset", Reply::fault(Fault::Reset), "unavailable"),
    ];
    for (index, (name, reply, expected_kind)) in modes.into_iter().enumerate() {
        let base = 1000 * (index as i64 + 1);
        mode(
            ctx,
            &api,
            &upstream,
            report,
            Mode {
                name,
                reply,
                expected_kind,
                base,
            },
        )
        .await?;
    }
    let (metrics, settle, quiet) = api
        .metrics_when(Duration::from_secs(3), |m| m.is_quiet())
        .await?;
    report.after = format!(
        "{}, breaker state {}",
        metrics.state_line(),
        metrics.get("recommendations_breaker_state")
    );
    report.check(
        "nothing left behind",
        quiet,
        format!("settled after {:.0} ms", ms(settle)),
    );
    super::stop_api(api, report).await?;
    upstream.shutdown().await;
    Ok(())
}

struct Mode {
    name: &'static str,
    reply: Reply,
    expected_kind: &'static str,
    /// User ids of this mode start above this.
    base: i64,
}

/// One dashboard: its answer (if any), latency and the recommendations error kind.
struct Probe {
    latency: Duration,
    answer: Option<Answer>,
}

impl Probe {
    fn status(&self) -> Option<u16> {
        self.answer.as_ref().map(|a| a.status)
    }

    /// The `kind` of the recommendations entry in `errors`, if there is one.
    fn kind(&self) -> Option<String> {
        let text = self.answer.as_ref()?.text();
        json_string_after(&text, "\"source\":\"recommendations\",\"kind\":\"")
    }

    fn label(&self) -> String {
        match (self.status(), self.kind()) {
            (Some(status), Some(kind)) => format!("{status} (recommendations {kind})"),
            (Some(status), None) => status.to_string(),
            (None, _) => "lost".to_owned(),
        }
    }
}

async fn dashboard(api: &Api, user: i64) -> Probe {
    let started = Instant::now();
    let answer = client::fetch(
        api.addr,
        &client::get(&format!("/api/users/{user}/dashboard"), false),
        Duration::from_secs(5),
    )
    .await
    .ok();
    Probe {
        latency: started.elapsed(),
        answer,
    }
}

async fn breaker_state(api: &Api) -> f64 {
    api.metrics()
        .await
        .map_or(f64::NAN, |m| m.get("recommendations_breaker_state"))
}

async fn mode(
    ctx: &Ctx,
    api: &Api,
    upstream: &upstream::Server,
    report: &mut ScenarioReport,
    mode: Mode,
) -> Result<()> {
    let name = mode.name;
    let threshold = i64::from(ctx.defaults.recommendations.breaker.failure_threshold);
    let source_timeout = ctx.defaults.service.dashboard.recommendations_timeout;
    // 1. Failures, concurrently (a hang costs one timeout, not five).
    let faulty: Vec<i64> = (1..=threshold + 1).map(|i| mode.base + i).collect();
    for &user in &faulty {
        upstream.set_user_reply(user, mode.reply);
    }
    let probes = futures::future::join_all(faulty.iter().map(|&user| dashboard(api, user))).await;
    let mut lost = 0;
    for probe in &probes {
        report.count_label(probe.label());
        lost += u64::from(probe.answer.is_none());
    }
    report.lost += lost;
    let partial = probes
        .iter()
        .filter(|p| p.status() == Some(200) && p.kind().as_deref() == Some(mode.expected_kind))
        .count();
    let slowest = probes.iter().map(|p| p.latency).max().unwrap_or_default();
    report.check(
        format!(
            "{name}: 200 with a recommendations `{}` error",
            mode.expected_kind
        ),
        partial == probes.len(),
        format!(
            "{partial} of {}: {}",
            probes.len(),
            sample(&probes.iter().map(Probe::label).collect::<Vec<_>>())
        ),
    );
    report.check(
        format!(
            "{name}: within the recommendations timeout ({} ms)",
            source_timeout.as_millis()
        ),
        slowest <= source_timeout + SLACK,
        format!("slowest {:.0} ms", ms(slowest)),
    );

    // 2. The breaker is open and fails fast.
    let state = breaker_state(api).await;
    let opened = state == 2.0;
    report.check(
        format!("{name}: the breaker opens (state 2)"),
        opened,
        format!("state {state}"),
    );
    let mut fast = Vec::new();
    for user in (11..=15).map(|i| mode.base + i) {
        let probe = dashboard(api, user).await;
        report.count_label(probe.label());
        report.lost += u64::from(probe.answer.is_none());
        fast.push(probe);
    }
    let open = fast
        .iter()
        .filter(|p| p.status() == Some(200) && p.kind().as_deref() == Some("circuit_open"))
        .count();
    let slowest = fast.iter().map(|p| p.latency).max().unwrap_or_default();
    report.check(
        format!(
            "{name}: fails fast while open (circuit_open within {} ms)",
            FAST.as_millis()
        ),
        open == fast.len() && slowest <= FAST,
        format!(
            "{open} of {} circuit_open, slowest {:.1} ms",
            fast.len(),
            ms(slowest)
        ),
    );

    // 3. Healthy again: the breaker closes after the cool-down.
    for &user in &faulty {
        upstream.clear_user_reply(user);
    }
    let healed = Instant::now();
    let mut closed_after = None;
    let mut user = mode.base + 100;
    while healed.elapsed() < COOLDOWN + Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        user += 1;
        let probe = dashboard(api, user).await;
        report.count_label(probe.label());
        report.lost += u64::from(probe.answer.is_none());
        if breaker_state(api).await == 0.0 {
            closed_after = Some(healed.elapsed());
            break;
        }
    }
    let after = dashboard(api, mode.base + 999).await;
    report.count_label(after.label());
    report.lost += u64::from(after.answer.is_none());
    let complete = after.status() == Some(200) && after.kind().is_none();
    report.check(
        format!("{name}: the breaker, opened, closes again (state 0) once the stand-in is healthy"),
        opened && closed_after.is_some() && complete,
        closed_after.map_or("still not closed".to_owned(), |d| {
            format!(
                "closed {:.0} ms after the stand-in healed (cool-down {} ms); next dashboard {}",
                ms(d),
                COOLDOWN.as_millis(),
                after.label()
            )
        }),
    );
    if let Some(d) = closed_after {
        report.recovery = Some(report.recovery.map_or(d, |r| r.max(d)));
    }
    Ok(())
}
