//! `spool-api`: the HTTP API (poem + poem-openapi). Clients submit jobs, poll them and
//! list models; jobs are committed to PostgreSQL and published to RabbitMQ.

pub mod admin;
pub mod allowed_methods;
pub mod auth;
pub mod batches;
pub mod body;
pub mod catalog;
pub mod completions;
pub mod error;
pub mod identity;
pub mod job_inserter;
pub mod jobs;
pub mod publisher;
pub mod ratelimit;
pub mod redis_handle;
pub mod routes;
pub mod state;
pub mod telemetry;
pub mod webhooks;
pub mod workers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use migration::{Migrator, MigratorTrait};
use poem::http::StatusCode;
use poem::listener::{Acceptor, Listener, TcpAcceptor, TcpListener};
use poem::middleware::{RequestId, ReuseId};
use poem::{Endpoint, EndpointExt, IntoEndpoint, IntoResponse, Request, Response, Route, Server};
use poem_openapi::OpenApiService;
use secrecy::ExposeSecret;
use spool_shared::manifest::Manifest;
use spool_shared::sealing::SecretSealer;
use spool_shared::{Settings, db};
use tokio_util::sync::CancellationToken;

use crate::allowed_methods::AllowedMethods;
use crate::auth::{TokenSigner, TokenVerifier};
use crate::catalog::ModelCatalog;
use crate::completions::CompletionWaiters;
use crate::identity::authn::Authenticator;
use crate::identity::mailer::Mailer;
use crate::job_inserter::JobInserter;
use crate::publisher::Publisher;
use crate::ratelimit::RateLimiter;
use crate::redis_handle::RedisHandle;
use crate::routes::admin::AdminApi;
use crate::routes::auth::AuthApi;
use crate::routes::batches::BatchesApi;
use crate::routes::health::HealthApi;
use crate::routes::jobs::JobsApi;
use crate::routes::me::MeApi;
use crate::routes::models::ModelsApi;
use crate::routes::tokens::TokensApi;
use crate::routes::webhooks::WebhooksApi;
use crate::state::AppState;
use crate::workers::WorkerRegistry;

/// How long in-flight requests get to finish after SIGTERM.
const GRACEFUL_SHUTDOWN: Duration = Duration::from_secs(30);

pub struct Application {
    acceptor: TcpAcceptor,
    port: u16,
    state: AppState,
    shutdown: CancellationToken,
}

impl Application {
    /// Connects to PostgreSQL (running pending migrations), starts the RabbitMQ
    /// publisher and the background tasks, and binds the listener. RabbitMQ being down
    /// does not stop the API: jobs wait in the outbox until it is back.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let manifest = Manifest::load(&settings.models_dir).context("loading the model manifest")?;
        let catalog = ModelCatalog::new(&manifest)?;
        telemetry::register_metrics(&catalog.names());
        let secret_key = settings
            .auth
            .secret_key
            .as_ref()
            .context("auth.secret_key is not set: generate a key pair with `spoolctl keys generate`")?;
        let signer = TokenSigner::new(secret_key.expose_secret(), &settings.auth.issuer).context("auth.secret_key")?;
        let verifier =
            TokenVerifier::new(&settings.auth.public_keys, &settings.auth.issuer).context("auth.public_keys")?;
        let sealer = SecretSealer::new(&settings.webhooks.sealing_keys).context("webhooks.sealing_keys")?;
        let mailer = Mailer::new(&settings).context("smtp_url")?;
        let db = db::connect(&settings).await.context("connecting to PostgreSQL")?;
        Migrator::up(&db, None).await.context("running migrations")?;
        webhooks::reseal_stored_secrets(&db, &sealer).await.context("sealing webhook secrets anew")?;
        let redis = RedisHandle::new(
            redis::Client::open(settings.redis_url.expose_secret()).context("redis_url")?,
            &settings.redis_prefix,
        );
        let authenticator = Authenticator::new(
            verifier,
            db.clone(),
            redis.clone(),
            Duration::from_secs(settings.auth.token_cache_secs),
        );
        let limiter = RateLimiter::new(redis.clone());
        let redis_for_workers = redis.clone();

        let shutdown = CancellationToken::new();
        let publisher = Publisher::start(&settings, catalog.names(), db.clone(), shutdown.clone());
        let waiters = CompletionWaiters::default();
        tokio::spawn(waiters.clone().listen(db.clone(), shutdown.clone()));
        tokio::spawn(publisher::run_outbox_relay(db.clone(), publisher.clone(), settings.clone(), shutdown.clone()));

        let acceptor = TcpListener::bind(settings.api.bind.clone())
            .into_acceptor()
            .await
            .with_context(|| format!("binding {}", settings.api.bind))?;
        let port = acceptor
            .local_addr()
            .first()
            .and_then(|addr| addr.as_socket_addr().map(|a| a.port()))
            .context("listener has no address")?;
        let state = AppState {
            inserter: JobInserter::start(db.clone()),
            db,
            catalog,
            publisher,
            waiters,
            redis,
            authenticator,
            limiter,
            signer,
            mailer,
            workers: WorkerRegistry::new(redis_for_workers, settings.worker.model_breaker),
            sealer,
            settings: Arc::new(settings),
        };
        Ok(Self { acceptor, port, state, shutdown })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A token that stops the server and its background tasks when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until SIGTERM or Ctrl-C.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            spool_shared::shutdown::wait_for_signal().await;
            tracing::info!("shutdown requested");
            shutdown.cancel();
        });
        self.run().await
    }

    /// Serves until the shutdown token is cancelled.
    pub async fn run(self) -> anyhow::Result<()> {
        let endpoint = endpoint(self.state.clone());
        tracing::info!(port = self.port, "spool-api listening");
        let shutdown = self.shutdown.clone();
        Server::new_with_acceptor(self.acceptor)
            .run_with_graceful_shutdown(endpoint, shutdown.cancelled_owned(), Some(GRACEFUL_SHUTDOWN))
            .await?;
        self.shutdown.cancel();
        Ok(())
    }
}

/// The OpenAPI service description (also used to write `openapi.json`).
/// Every resource's API, combined.
pub type Apis = (JobsApi, BatchesApi, ModelsApi, AuthApi, MeApi, TokensApi, WebhooksApi, AdminApi, HealthApi);

pub fn openapi_service() -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (JobsApi, BatchesApi, ModelsApi, AuthApi, MeApi, TokensApi, WebhooksApi, AdminApi, HealthApi),
        "Spool",
        env!("CARGO_PKG_VERSION"),
    )
    .description("Asynchronous inference: submit jobs, poll or long-poll their results.")
}

fn endpoint(state: AppState) -> impl Endpoint {
    let api = openapi_service();
    let allowed_methods = Arc::new(AllowedMethods::from_spec(&serde_json::from_str(&api.spec()).unwrap_or_default()));
    let spec = api.spec_endpoint();
    let docs = api.swagger_ui();
    let metrics = telemetry::metrics_handle();
    let max_body = state.settings.api.max_body_bytes;
    let max_batch = state.settings.api.max_batch_bytes;
    let batch_turns =
        Arc::new(tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())));
    Route::new()
        .nest("/", api)
        .at("/openapi.json", spec)
        .nest("/docs", docs)
        .at(
            "/metrics",
            poem::endpoint::make_sync(move |_| {
                poem::Response::builder().content_type("text/plain; version=0.0.4").body(metrics.render())
            }),
        )
        .around(move |endpoint, request| {
            let batch_turns = Arc::clone(&batch_turns);
            async move {
                // Batches are the one place for large bodies.
                let is_batch = request.uri().path() == "/v1/batches" && request.method() == poem::http::Method::POST;
                let request = limit_body(request, if is_batch { max_batch } else { max_body })?;
                if is_batch {
                    batch_in_turn(&endpoint, request, &batch_turns).await
                } else {
                    Ok(endpoint.call(request).await?.into_response())
                }
            }
        })
        // Outside the body limit: a request without a valid token, or over its rate, is
        // refused before any of its body is read.
        .around(identity::middleware::authenticate_and_limit)
        .data(state)
        .catch_all_error(error::problem_from_poem)
        // Every response: the `Allow` header a 405 must carry, and the request's duration.
        .around(move |endpoint, request| {
            let allowed_methods = Arc::clone(&allowed_methods);
            async move {
                let method = request.method().to_string();
                let uri = request.uri().clone();
                let started = Instant::now();
                let mut response = endpoint.get_response(request).await;
                if response.status() == StatusCode::METHOD_NOT_ALLOWED
                    && let Some(allow) = allowed_methods.for_path(uri.path())
                {
                    response.headers_mut().insert(poem::http::header::ALLOW, allow.clone());
                }
                let status = response.status().as_u16().to_string();
                metrics::histogram!("spool_http_request_duration_seconds", "method" => method, "status" => status)
                    .record(started.elapsed().as_secs_f64());
                Ok(response)
            }
        })
        .with(RequestId::with_header_name(REQUEST_ID).reuse_id(ReuseId::Use))
        .around(|endpoint, mut request| async move {
            // A client's own id is kept only when it is short and plain: it is logged and
            // stored with the jobs it submits. Otherwise `RequestId` makes a new one.
            if request.header(REQUEST_ID).is_some_and(|id| !is_plain_request_id(id)) {
                request.headers_mut().remove(REQUEST_ID);
            }
            Ok(endpoint.get_response(request).await)
        })
        .into_endpoint()
}

const REQUEST_ID: &str = "x-request-id";

/// 1–128 letters, digits and `-_.:` (a UUID, a ULID, a proxy's hex id all qualify).
fn is_plain_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Refuses bodies over `max` bytes with a 413, whether or not they declare a length
/// (poem's own `SizeLimit` also refuses every request without `Content-Length`). A body
/// without one (HTTP/1.1 chunked, or HTTP/2, which needs neither header) is counted as
/// the handler reads it, and fails with [`error::BodyTooLarge`] past `max`: nothing is
/// read before the handler asks, so a request refused for its token costs no reading.
fn limit_body(mut request: Request, max: usize) -> Result<Request, error::BodyTooLarge> {
    let declared = request
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    match declared {
        Some(length) if length > max => return Err(error::BodyTooLarge { max }),
        Some(_) => {}
        None => {
            let body = request.take_body();
            if body.is_empty() {
                // No body (every GET, long-polls included): nothing to count.
                request.set_body(body);
                return Ok(request);
            }
            let mut read = 0;
            let counted = body.into_bytes_stream().map(move |chunk| {
                let chunk = chunk?;
                read += chunk.len();
                if read > max { Err(std::io::Error::other(error::BodyTooLarge { max })) } else { Ok(chunk) }
            });
            request.set_body(poem::Body::from_bytes_stream(counted));
        }
    }
    Ok(request)
}

/// A batch is parsed whole, and as JSON values it takes up to ~30× its bytes. Its body is
/// read first, at the client's pace, holding only its bytes; then batches take turns, one
/// per core, to parse and insert: that memory is bounded by the cores, not the callers,
/// and a slow upload holds no turn. A request without a valid token is passed on unread,
/// to be refused.
async fn batch_in_turn<E: Endpoint>(
    endpoint: &E,
    mut request: Request,
    turns: &tokio::sync::Semaphore,
) -> poem::Result<Response> {
    if !matches!(request.extensions().get::<auth::AuthOutcome>(), Some(auth::AuthOutcome::Authenticated(_))) {
        return Ok(endpoint.call(request).await?.into_response());
    }
    let body = request.take_body().into_bytes().await?;
    request.set_body(body);
    let _turn = turns.acquire().await.expect("the semaphore is never closed. This is a bug.");
    Ok(endpoint.call(request).await?.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_plain_request_ids_are_kept() {
        assert!(is_plain_request_id("3f2b9c1e-5d4a-4b8e-9f00-1a2b3c4d5e6f"));
        assert!(is_plain_request_id("client.req:42_a"));
        assert!(!is_plain_request_id(""));
        assert!(!is_plain_request_id("has space"));
        assert!(!is_plain_request_id("quote\"s"));
        assert!(!is_plain_request_id(&"a".repeat(129)));
    }
}
