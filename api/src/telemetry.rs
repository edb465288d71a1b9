//! Prometheus metrics for the API process.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::workers::ModelHealth;

/// The process-wide recorder's handle, installed on first use (tests build several
/// applications in one process; the recorder can only be installed once).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            handle
        })
        .clone()
}

/// Creates the counters operators alert on at zero, so each series exists (and a rule on
/// `increase(…)` sees its first rise) before anything has gone wrong.
pub fn register_metrics(models: &[String]) {
    let _ = metrics_handle(); // the recorder must be installed first
    metrics::counter!("spool_ratelimit_unavailable_total").increment(0);
    metrics::counter!("spool_ratelimit_rejected_total").increment(0);
    for model in models {
        metrics::counter!("spool_jobs_submitted_total", "model" => model.clone()).increment(0);
        for reason in [ModelHealth::BreakersOpen, ModelHealth::Failing] {
            metrics::counter!("spool_api_rejected_unavailable_total", "model" => model.clone(), "reason" => reason.as_str())
                .increment(0);
        }
    }
}
