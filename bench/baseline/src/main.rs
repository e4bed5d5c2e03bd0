//! The bare dashboard: what the service does for one dashboard with none of its features. It is
//! the baseline `cargo xtask bench overhead` measures the service against, not part of the
//! product.
//!
//! One actix-web server; per request, one pooled connection (deadpool-postgres, 20 connections,
//! prepared statements cached) on which the same three SELECTs as the service's are pipelined,
//! the same upstream call (hyper-util's pooled client), all four awaited with `tokio::join!`,
//! and the same JSON. No metrics, tracing, request id, task group, gate, timeouts, circuit
//! breaker or disconnect watch. Settings from the environment: `DATABASE_URL`, `UPSTREAM_URL`
//! (`http://host:port`), `PORT`, `WORKERS`.

use std::sync::Arc;

use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio_postgres::NoTls;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PROFILE: &str = "SELECT id, username, email, avatar FROM users WHERE id = $1";
const ORDERS: &str = "SELECT id, product, amount, created_at FROM orders \
     WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT 101";
const REVIEWS: &str = "SELECT id, product_id, rating, content FROM reviews \
     WHERE user_id = $1 ORDER BY id DESC LIMIT 101";

struct State {
    pool: Pool,
    http: Client<HttpConnector, Empty<bytes::Bytes>>,
    upstream: String,
}

#[derive(Serialize)]
struct Profile {
    id: i64,
    username: String,
    email: String,
    avatar: Option<String>,
}

#[derive(Serialize)]
struct Order {
    id: i64,
    product: String,
    #[serde(with = "rust_decimal::serde::str")]
    amount: Decimal,
    created_at: DateTime<Utc>,
}

#[derive(Serialize)]
struct Review {
    id: i64,
    product_id: i64,
    rating: i16,
    content: String,
}

#[derive(Serialize)]
struct Dashboard {
    profile: Profile,
    orders: Vec<Order>,
    more_orders: bool,
    reviews: Vec<Review>,
    more_reviews: bool,
    recommendations: Box<RawValue>,
    errors: [(); 0],
}

#[derive(Serialize)]
struct Envelope<T> {
    status: &'static str,
    data: T,
}

#[derive(serde::Deserialize)]
struct Items {
    items: Box<RawValue>,
}

async fn dashboard(state: web::Data<Arc<State>>, id: web::Path<i64>) -> HttpResponse {
    let id = id.into_inner();
    let uri = format!("{}/users/{id}/recommendations", state.upstream);
    let recommendations = async {
        let response = state.http.get(uri.parse().ok()?).await.ok()?;
        let body = response.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice::<Items>(&body).ok().map(|i| i.items)
    };
    // The connection is taken inside the reads and goes back to the pool when they end, not
    // when the (perhaps slower) upstream call does.
    let reads = async {
        let conn = state.pool.get().await.map_err(|e| e.to_string())?;
        let (profile, orders, reviews) = tokio::join!(
            async {
                conn.query_opt(&conn.prepare_cached(PROFILE).await?, &[&id])
                    .await
            },
            async {
                conn.query(&conn.prepare_cached(ORDERS).await?, &[&id])
                    .await
            },
            async {
                conn.query(&conn.prepare_cached(REVIEWS).await?, &[&id])
                    .await
            },
        );
        let rows = (|| Ok::<_, tokio_postgres::Error>((profile?, orders?, reviews?)))();
        rows.map_err(|e| e.to_string())
    };
    let (reads, recommendations) = tokio::join!(reads, recommendations);
    let (profile, orders, reviews) = match reads {
        Ok(rows) => rows,
        Err(error) => {
            eprintln!("a read failed: {error}");
            return HttpResponse::ServiceUnavailable().finish();
        }
    };
    let Some(profile) = profile else {
        return HttpResponse::NotFound()
            .content_type("application/json")
            .body(
                r#"{"status":"error","error":{"code":"user_not_found","message":"no such user"}}"#,
            );
    };
    let more_orders = orders.len() > 100;
    let more_reviews = reviews.len() > 100;
    let dashboard = Dashboard {
        profile: Profile {
            id: profile.get(0),
            username: profile.get(1),
            email: profile.get(2),
            avatar: profile.get(3),
        },
        orders: orders
            .iter()
            .take(100)
            .map(|row| Order {
                id: row.get(0),
                product: row.get(1),
                amount: row.get(2),
                created_at: row.get(3),
            })
            .collect(),
        more_orders,
        reviews: reviews
            .iter()
            .take(100)
            .map(|row| Review {
                id: row.get(0),
                product_id: row.get(1),
                rating: row.get(2),
                content: row.get(3),
            })
            .collect(),
        more_reviews,
        recommendations: recommendations
            .unwrap_or_else(|| RawValue::from_string("[]".to_owned()).unwrap_or_default()),
        errors: [],
    };
    HttpResponse::Ok().json(Envelope {
        status: "success",
        data: dashboard,
    })
}

#[actix_web::main]
async fn main() -> Result<()> {
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
    let upstream = std::env::var("UPSTREAM_URL").context("UPSTREAM_URL is not set")?;
    let port: u16 = std::env::var("PORT").context("PORT is not set")?.parse()?;
    let workers: usize = std::env::var("WORKERS").map_or(Ok(2), |w| w.parse())?;
    let manager = Manager::from_config(
        url.parse::<tokio_postgres::Config>()?,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(20).build()?;
    let http = Client::builder(TokioExecutor::new()).build_http();
    let state = Arc::new(State {
        pool,
        http,
        upstream,
    });
    HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(Arc::clone(&state)))
            .route("/api/users/{id}/dashboard", web::get().to(dashboard))
    })
    .workers(workers)
    .bind(("127.0.0.1", port))?
    .run()
    .await?;
    Ok(())
}
