//! `mixserve serve`: the engine behind the OpenAI API.

use super::ModelArgs;
use crate::engine::Engine;
use crate::server::{self, AppState, ServerConfig, DEFAULT_BODY_LIMIT};
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Address to bind (127.0.0.1 keeps the server local; 0.0.0.0 exposes it).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,

    /// The model id clients use; defaults to --model as given.
    #[arg(long)]
    pub served_model_name: Option<String>,

    /// Require `Authorization: Bearer KEY` on /v1 routes.
    #[arg(long, env = "MIXSERVE_API_KEY")]
    pub api_key: Option<String>,

    /// Requests waiting to start beyond which new ones get 429.
    #[arg(long)]
    pub max_waiting: Option<usize>,

    /// Largest request body, in bytes.
    #[arg(long, default_value_t = DEFAULT_BODY_LIMIT)]
    pub max_body_bytes: usize,

    /// On SIGTERM / Ctrl-C, how long in-flight requests may take to finish, in seconds.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve_async(args))
}

async fn serve_async(args: ServeArgs) -> Result<()> {
    let addr = format!("{}:{}", args.host, args.port);
    // Bind first: /health answers 503 while the model loads.
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let served_name = args.served_model_name.clone();
    let state = AppState::new(ServerConfig {
        served_name: served_name
            .clone()
            .unwrap_or_else(|| args.model.model.clone()),
        api_key: args.api_key.clone(),
        body_limit: args.max_body_bytes,
    });
    tracing::info!("listening on http://{addr}");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(server::serve(listener, state.clone(), {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|&s| s).await;
        }
    }));

    let model_args = args.model.clone();
    let max_waiting = args.max_waiting;
    let loading = tokio::task::spawn_blocking(move || -> Result<Engine> {
        let loaded = model_args.load()?;
        let mut config = model_args.engine.config(&loaded.model)?;
        config.max_waiting = max_waiting;
        Ok(Engine::start(loaded.model, loaded.tokenizer, config)?)
    });
    tokio::select! {
        loaded = loading => {
            let engine = loaded.context("the model loader panicked")??;
            tracing::info!("model loaded; ready");
            state.set_engine(Arc::new(engine));
        }
        _ = shutdown_signal() => {
            tracing::info!("interrupted while loading");
            return Ok(());
        }
    }

    shutdown_signal().await;
    tracing::info!(
        "shutting down: no new connections; waiting up to {}s for in-flight requests",
        args.shutdown_timeout
    );
    let _ = stop_tx.send(true);
    let drained =
        match tokio::time::timeout(Duration::from_secs(args.shutdown_timeout), server).await {
            Ok(Ok(Ok(()))) => true,
            Ok(Ok(Err(e))) => {
                tracing::warn!("server error during shutdown: {e}");
                true
            }
            Ok(Err(e)) => {
                tracing::warn!("server task failed: {e}");
                true
            }
            Err(_) => {
                tracing::warn!("in-flight requests did not finish in time; cancelling them");
                false
            }
        };
    if drained {
        if let Some(engine) = state.engine_handle() {
            let engine = engine.clone();
            let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        }
    }
    // Otherwise the runtime is dropped on return: that cancels the remaining connections, which
    // drops their request streams, and the engine thread ends once they are gone.
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
