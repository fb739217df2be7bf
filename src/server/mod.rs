//! The OpenAI-compatible HTTP layer: axum routes over the engine. It knows no tensors.

mod chat;
mod collect;
mod completions;
mod error;
mod extract;
mod metrics;
pub mod openai;
mod params;
mod stream;
mod tokens;

pub use error::ApiError;
pub use metrics::Metrics;

use crate::engine::Engine;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use std::future::Future;
use std::sync::{Arc, OnceLock};
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

/// Default limit on request bodies (OpenAI's clients never come close).
pub const DEFAULT_BODY_LIMIT: usize = 32 * 1024 * 1024;

pub struct ServerConfig {
    /// The model id clients use (`/v1/models`, the `model` field).
    pub served_name: String,
    pub api_key: Option<String>,
    pub body_limit: usize,
}

pub struct AppState {
    engine: OnceLock<Arc<Engine>>,
    served_name: String,
    api_key: Option<String>,
    created: u64,
    metrics: Arc<Metrics>,
    body_limit: usize,
}

impl AppState {
    /// A server whose engine arrives later (`/health` says 503 until [`AppState::set_engine`]).
    pub fn new(config: ServerConfig) -> Arc<Self> {
        Arc::new(Self {
            engine: OnceLock::new(),
            served_name: config.served_name,
            api_key: config.api_key,
            created: collect::unix_now(),
            metrics: Arc::new(Metrics::new()),
            body_limit: config.body_limit,
        })
    }

    pub fn set_engine(&self, engine: Arc<Engine>) {
        let _ = self.engine.set(engine);
    }

    pub fn engine_handle(&self) -> Option<&Arc<Engine>> {
        self.engine.get()
    }

    fn engine(&self) -> Result<Arc<Engine>, ApiError> {
        self.engine
            .get()
            .cloned()
            .ok_or_else(|| ApiError::unavailable("the model is still loading"))
    }

    /// Requests naming another model get 404, as OpenAI answers.
    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if !m.is_empty() && m != self.served_name => Err(ApiError {
                param: Some("model".into()),
                code: Some("model_not_found".into()),
                ..ApiError::not_found(format!(
                    "the model `{m}` does not exist; this server serves `{}`",
                    self.served_name
                ))
            }),
            _ => Ok(()),
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.body_limit))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .with_state(state)
}

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // TCP_NODELAY: streamed chunks are small writes, and with Nagle's algorithm each waited for
    // the client's (delayed, up to 40 ms) ACK of the previous one on kept-alive connections.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn require_api_key(
    State(app): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(key) = &app.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return Err(ApiError::unauthorized());
        }
    }
    Ok(next.run(req).await)
}

async fn models(State(app): State<Arc<AppState>>) -> Result<Json<openai::ModelList>, ApiError> {
    let engine = app.engine()?;
    Ok(Json(openai::ModelList {
        object: "list",
        data: vec![openai::ModelCard {
            id: app.served_name.clone(),
            object: "model",
            created: app.created,
            owned_by: "mixserve",
            max_model_len: engine.max_context(),
        }],
    }))
}

async fn health(State(app): State<Arc<AppState>>) -> Response {
    match app.engine.get() {
        Some(e) if e.is_alive() => (StatusCode::OK, "ok").into_response(),
        Some(_) => ApiError::unavailable("the engine has stopped").into_response(),
        None => ApiError::unavailable("the model is still loading").into_response(),
    }
}

async fn prometheus(State(app): State<Arc<AppState>>) -> Response {
    let body = app.metrics.render(app.engine.get().map(|e| e.as_ref()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}
