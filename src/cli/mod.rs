//! CLI commands composing loader, model, engine (and server).
