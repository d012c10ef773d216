//! `[[routes]]`: a route is used as a request's `model`, over targets that are `[[models]]`
//! (see [`crate::upstream::route`] for what each strategy does).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::file::FileRoute;
use super::ModelConfig;
use crate::stream::{millis_or, Timeouts};
use crate::upstream::route::{Breaker, Retry, Route, Strategy, Target};
use crate::upstream::Upstream;

/// A route's deadline when it names none.
pub const DEFAULT_ROUTE_TOTAL: Duration = Duration::from_secs(600);
/// `hedge`: how long a target may go without a chunk before the next starts, by default.
pub const DEFAULT_HEDGE_AFTER: Duration = Duration::from_millis(300);
/// Retries of a failed attempt before its first chunk, by default.
pub const DEFAULT_RETRIES: u32 = 1;
/// The first retry's backoff, by default.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(100);
/// Failures in a row that open a target's circuit breaker, by default.
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
/// How long an open breaker skips its target, by default.
pub const DEFAULT_BREAKER_OPEN: Duration = Duration::from_secs(30);
/// How long after a gather's deadline the relay's own total timer fires: the route's deadline
/// cuts the slow targets and ends the answer with what finished; the relay's is the backstop.
const GATHER_BACKSTOP: Duration = Duration::from_secs(1);

/// What a route needs of a model beyond its [`ModelConfig`].
#[derive(Debug, Clone)]
pub(super) struct TargetTraits {
    /// It can continue a half-finished answer.
    pub(super) can_continue: bool,
    /// Its circuit breaker.
    pub(super) breaker: Arc<Breaker>,
}

/// Turns `[[routes]]` into models whose upstream is a route; `models` are the configured models
/// (the targets). Errors are `(key, reason)`.
pub(super) fn build(
    routes: Vec<FileRoute>,
    models: &[ModelConfig],
    traits: &HashMap<String, TargetTraits>,
) -> Result<Vec<ModelConfig>, (String, String)> {
    let mut out = Vec::new();
    for (i, r) in routes.into_iter().enumerate() {
        let key = |k: &str| format!("routes[{i}].{k}");
        if r.name.trim().is_empty() {
            return Err((key("name"), "must not be empty".into()));
        }
        if models.iter().any(|m| m.name == r.name)
            || out.iter().any(|m: &ModelConfig| m.name == r.name)
        {
            return Err((
                key("name"),
                format!("{:?} is already a model or a route", r.name),
            ));
        }
        if r.targets.is_empty() {
            return Err((key("targets"), "must name at least one model".into()));
        }
        let mut targets = Vec::new();
        for (j, name) in r.targets.iter().enumerate() {
            let model = models.iter().find(|m| &m.name == name).ok_or_else(|| {
                (
                    format!("routes[{i}].targets[{j}]"),
                    format!("{name:?} is not a [[models]] name (a route's targets are models)"),
                )
            })?;
            let t = traits.get(name).ok_or_else(|| {
                (
                    format!("routes[{i}].targets[{j}]"),
                    format!("{name:?} cannot be a target"),
                )
            })?;
            targets.push(Target {
                name: name.clone(),
                upstream: model.upstream.clone(),
                upstream_model: model.upstream_model.clone(),
                first_token: model.timeouts.first_token,
                can_continue: t.can_continue,
                breaker: t.breaker.clone(),
            });
        }
        if r.hedge_after_ms.is_some() && r.strategy != Strategy::Hedge {
            return Err((
                key("hedge_after_ms"),
                "only applies to strategy = \"hedge\"".into(),
            ));
        }
        let total = millis_or(r.total_timeout_ms, DEFAULT_ROUTE_TOTAL);
        let idle = millis_or(
            r.idle_timeout_ms,
            targets
                .iter()
                .filter_map(|t| models.iter().find(|m| m.name == t.name))
                .map(|m| m.timeouts.idle)
                .max()
                .unwrap_or(Timeouts::default().idle),
        );
        let route = Route {
            name: r.name.clone(),
            strategy: r.strategy,
            targets,
            total,
            hedge_after: millis_or(r.hedge_after_ms, DEFAULT_HEDGE_AFTER),
            retry: Retry {
                retries: r.retries.unwrap_or(DEFAULT_RETRIES),
                backoff: millis_or(r.retry_backoff_ms, DEFAULT_BACKOFF),
            },
        };
        out.push(ModelConfig {
            name: r.name,
            upstream: Upstream::Route(Arc::new(route)),
            upstream_model: None,
            timeouts: Timeouts {
                // The route runs each target's first-token timer itself, moving on when one
                // fires; the stream's own first-token limit is the route's deadline.
                first_token: total,
                idle,
                total: if r.strategy == Strategy::Gather {
                    total + GATHER_BACKSTOP
                } else {
                    total
                },
            },
            on_disconnect: r.on_disconnect.unwrap_or_default(),
        });
    }
    Ok(out)
}
