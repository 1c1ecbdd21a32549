//! The persistence boundary: what the core asks to make durable, and the store
//! interface that a node implements (SQLite and PostgreSQL in `node`; in memory here).
//!
//! Contract: the driver applies every [`Change`] durably, in order, before it acts
//! on any output the core emitted after it. A node restarts from [`Store::load`].
//! This module must never do I/O itself beyond the in-memory map.

use crate::case::CaseRecord;
use federation_proto::CaseId;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One change to make durable.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Insert or replace the whole record of one case. Shared with the core, which
    /// copies the record only if it changes while this change is still held.
    PutCase(Arc<CaseRecord>),
}

/// Storage of case records, as the node's data plane implements it.
pub trait Store {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Makes the change durable before returning.
    fn apply(&mut self, change: &Change) -> Result<(), Self::Error>;
    /// Every stored record, for a restart.
    fn load(&self) -> Result<Vec<CaseRecord>, Self::Error>;
}

/// A store that keeps records in memory: for tests and the simulator.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    cases: BTreeMap<CaseId, CaseRecord>,
    /// How many changes were applied (for tests).
    pub applied: u64,
}

impl MemStore {
    pub fn get(&self, id: &CaseId) -> Option<&CaseRecord> {
        self.cases.get(id)
    }
    pub fn len(&self) -> usize {
        self.cases.len()
    }
    pub fn is_empty(&self) -> bool {
        self.cases.is_empty()
    }
}

impl Store for MemStore {
    type Error = std::convert::Infallible;
    fn apply(&mut self, change: &Change) -> Result<(), Self::Error> {
        match change {
            Change::PutCase(record) => {
                self.cases.insert(record.info.case_id, (**record).clone());
            }
        }
        self.applied += 1;
        Ok(())
    }
    fn load(&self) -> Result<Vec<CaseRecord>, Self::Error> {
        Ok(self.cases.values().cloned().collect())
    }
}
