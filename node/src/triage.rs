//! The daemon's model host: answers the core's `Output::RunModel` by reading the
//! case's attachments with the node's local models, off the async runtime.
//!
//! Reads run on tokio's blocking pool, at most [`READS_CONCURRENT_MAX`] at once
//! (a semaphore); at most [`READS_QUEUED_MAX`] more may wait. A read asked for
//! beyond that is answered at once with an error, and the core carries on as if
//! there were no model (the case climbs): a busy village PC never stalls a case.
//!
//! Built without the `models` feature, the host has no models and every request
//! is answered "not installed" (the configuration refuses `[[models]]` then).
//!
//! This module must never decide what a result means: it hands labels and
//! confidences to `tiers::Node::handle_model_result`.

use crate::config::ModelConfig;
use federation_proto::CaseId;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tiers::{ModelOutcome, ModelSpec};

/// Model reads running at once (the machine's other work needs its cores too).
pub const READS_CONCURRENT_MAX: usize = 2;
/// Model reads waiting for a slot at most; beyond, a read is refused at once.
pub const READS_QUEUED_MAX: usize = 64;

/// A loaded model as the host keeps it.
#[cfg(feature = "models")]
type Hosted = Arc<crate::models::local::LocalModel>;
#[cfg(not(feature = "models"))]
type Hosted = ();

/// The node's models, ready to read.
#[derive(Clone)]
pub struct ModelHost {
    models: Vec<(ModelSpec, Hosted)>,
    slots: Arc<tokio::sync::Semaphore>,
    waiting: Arc<AtomicUsize>,
}

impl std::fmt::Debug for ModelHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelHost").field("models", &self.specs()).finish()
    }
}

impl ModelHost {
    /// Loads every configured model and measures its speed on this machine.
    pub fn load(configs: &[ModelConfig]) -> Result<ModelHost, String> {
        let mut models = Vec::new();
        for c in configs {
            models.push(load_one(c)?);
        }
        Ok(ModelHost {
            models,
            slots: Arc::new(tokio::sync::Semaphore::new(READS_CONCURRENT_MAX)),
            waiting: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// What the core is told this node can read (id, version, task, thresholds and
    /// measured cases per hour).
    pub fn specs(&self) -> Vec<ModelSpec> {
        self.models.iter().map(|(s, _)| s.clone()).collect()
    }

    /// Reads `files` (the case's attachments) with `model`; `done` gets the outcome
    /// (from a blocking-pool thread, or at once when refused).
    pub fn run(
        &self,
        case_id: CaseId,
        model: &str,
        files: Vec<PathBuf>,
        done: impl FnOnce(CaseId, Result<ModelOutcome, String>) + Send + 'static,
    ) {
        let Some((spec, hosted)) = self.models.iter().find(|(s, _)| s.id == model).cloned() else {
            return done(case_id, Err(format!("model {model} is not installed")));
        };
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= READS_QUEUED_MAX + READS_CONCURRENT_MAX {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return done(case_id, Err(format!("model {model} is busy ({READS_QUEUED_MAX} reads waiting)")));
        }
        let (slots, waiting) = (self.slots.clone(), self.waiting.clone());
        tokio::spawn(async move {
            let permit = slots.acquire_owned().await;
            let result = match permit {
                Ok(permit) => {
                    let r = tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        read_files(&spec, &hosted, &files)
                    })
                    .await;
                    r.unwrap_or_else(|e| Err(format!("model read crashed: {e}")))
                }
                Err(_) => Err("model host closed".into()),
            };
            waiting.fetch_sub(1, Ordering::SeqCst);
            done(case_id, result);
        });
    }
}

#[cfg(feature = "models")]
fn load_one(c: &ModelConfig) -> Result<(ModelSpec, Hosted), String> {
    use crate::models::{ModelKind, local};
    let kind: ModelKind = c.kind.parse()?;
    let weights = match &c.weights {
        Some(p) => std::fs::read(p).map_err(|e| format!("model {}: {}: {e}", c.kind, p.display()))?,
        None => kind.shipped_weights().to_vec(),
    };
    let model = local::LocalModel::load(kind, &weights).map_err(|e| format!("model {}: {e}", c.kind))?;
    tracing::info!(
        model = kind.name(),
        version = %model.version,
        read_ms = model.read_time.as_secs_f64() * 1000.0,
        "local model loaded"
    );
    let spec = ModelSpec {
        id: kind.name().into(),
        version: model.version.clone(),
        modality: kind.modality(),
        tasks: vec![kind.task().into()],
        threshold: c.thresholds.unwrap_or(local::default_thresholds(kind)),
        cases_per_hour: model.cases_per_hour(),
    };
    Ok((spec, Arc::new(model)))
}

#[cfg(not(feature = "models"))]
fn load_one(c: &ModelConfig) -> Result<(ModelSpec, Hosted), String> {
    Err(format!("model {}: this build has no model runtime (the `models` feature is off)", c.kind))
}

/// Reads the first attachment the model accepts.
#[cfg(feature = "models")]
fn read_files(spec: &ModelSpec, model: &Hosted, files: &[PathBuf]) -> Result<ModelOutcome, String> {
    let mut why = Vec::new();
    for f in files {
        match crate::models::inputs::load(f) {
            Ok(input) if input.kind() == model.kind => {
                let reading = model.read_input(&input).map_err(|e| e.to_string())?;
                return Ok(ModelOutcome { model: spec.id.clone(), version: reading.version, labels: reading.labels });
            }
            Ok(input) => why.push(format!("a {} input", input.kind().name())),
            Err(e) => why.push(e),
        }
    }
    Err(format!("no attachment the {} model reads ({})", spec.id, why.join("; ")))
}

#[cfg(not(feature = "models"))]
fn read_files(spec: &ModelSpec, _: &Hosted, _: &[PathBuf]) -> Result<ModelOutcome, String> {
    Err(format!("model {} is not installed", spec.id))
}
