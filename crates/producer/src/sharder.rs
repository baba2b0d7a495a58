//! Per-field buffers that become shard messages, with a bounded window of unconfirmed publishes
//! and a checkpoint per confirmed shard. A shard's content is a function of the plan (source,
//! shard size) alone, so a resumed plan re-reads the segment, skips each field's values from
//! lines its checkpoint covers, and publishes the rest under the same indexes: a shard published
//! twice is the same shard, counted once by the workers' done-set.

use crate::plan::{Deps, PlanError};
use audience_export_core::amqp::PendingConfirm;
use audience_export_core::contract::{ExportJob, PhoneCountry};
use audience_export_core::progress::{now_ms, ExportProgress, FieldTotals};
use audience_export_core::{Field, Shard};
use lapin::types::FieldTable;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};

/// One field's part of the plan as it is being read.
#[derive(Default)]
struct FieldState {
    audience_id: String,
    buffer: Vec<String>,
    totals: FieldTotals,
    /// Lines before this one had their values of this field published by an earlier attempt.
    skip_before: u64,
    /// One past the line of the buffer's last value.
    end_line: u64,
}

/// A shard sent and not confirmed yet.
struct InFlight {
    field: Field,
    index: u64,
    end_line: u64,
    confirm: PendingConfirm,
}

pub struct Sharder<'a> {
    deps: &'a Deps,
    job: &'a ExportJob,
    plan: String,
    shard_size: usize,
    fields: BTreeMap<Field, FieldState>,
    pending: VecDeque<InFlight>,
    /// Country of national phone numbers: the job's, else the workspace's default.
    phone_country: Option<PhoneCountry>,
    /// Set when another planner took the lease: stop publishing at once.
    lease_lost: &'a AtomicBool,
    /// Why the export was stopped (read after each shard), if it was.
    pub stopped: Option<String>,
}

impl<'a> Sharder<'a> {
    /// A sharder that takes up where `progress`'s checkpoints left off (nothing, on a new plan).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        deps: &'a Deps,
        job: &'a ExportJob,
        plan: String,
        shard_size: usize,
        audiences: BTreeMap<Field, String>,
        progress: &ExportProgress,
        phone_country: Option<PhoneCountry>,
        lease_lost: &'a AtomicBool,
    ) -> Self {
        let fields = audiences
            .into_iter()
            .map(|(field, audience_id)| {
                let checkpoint = progress.field(field);
                let state = FieldState {
                    audience_id,
                    buffer: Vec::with_capacity(shard_size),
                    totals: FieldTotals {
                        shards: checkpoint.shards,
                        ..FieldTotals::default()
                    },
                    skip_before: checkpoint.checkpoint_line,
                    end_line: 0,
                };
                (field, state)
            })
            .collect();
        Sharder {
            deps,
            job,
            plan,
            shard_size,
            fields,
            pending: VecDeque::new(),
            phone_country,
            lease_lost,
            stopped: None,
        }
    }

    /// Whether an earlier attempt published anything.
    pub fn resumed(&self) -> bool {
        self.fields.values().any(|f| f.totals.shards > 0)
    }

    /// Takes `field`'s value of the member on `line` (0-based, counting malformed lines).
    pub async fn push(
        &mut self,
        field: Field,
        line: u64,
        value: Option<String>,
    ) -> Result<(), PlanError> {
        let state = self.fields.entry(field).or_default();
        let Some(value) = value else {
            state.totals.missing += 1;
            return Ok(());
        };
        state.totals.with_value += 1;
        if line < state.skip_before {
            return Ok(());
        }
        state.buffer.push(value);
        state.end_line = line + 1;
        if state.buffer.len() >= self.shard_size {
            self.flush(field).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, field: Field) -> Result<(), PlanError> {
        if self.lease_lost.load(Ordering::Relaxed) {
            return Err(PlanError::LeaseLost);
        }
        let state = self.fields.entry(field).or_default();
        let records = std::mem::take(&mut state.buffer);
        if records.is_empty() {
            return Ok(());
        }
        let index = state.totals.shards;
        let shard = Shard {
            export_id: self.job.export_id.clone(),
            workspace_id: self.job.workspace_id.clone(),
            audience_id: state.audience_id.clone(),
            ad_account_id: self.job.ad_account_id.clone(),
            field,
            shard_index: index as u32,
            plan: self.plan.clone(),
            records,
            attempt: 1,
            default_phone_country: self.phone_country,
            dry_run: self.job.dry_run,
        };
        state.totals.shards += 1;
        let end_line = state.end_line;
        let body = serde_json::to_vec(&shard).expect("a shard always serializes");
        let confirm = self
            .deps
            .publisher
            .send(
                "",
                &self.deps.topology.shards(),
                &body,
                FieldTable::default(),
            )
            .await?;
        self.pending.push_back(InFlight {
            field,
            index,
            end_line,
            confirm,
        });
        self.deps.metrics.shards.with(field).inc();
        while self.pending.len() >= self.deps.confirm_window.max(1) {
            self.confirm_oldest().await?;
        }
        // One read per shard (10,000 records): cheap next to streaming a segment for nothing.
        self.stopped = self.deps.progress.stop_reason(&self.job.export_id).await?;
        Ok(())
    }

    /// Waits for the oldest publish's confirm, then records it as the field's checkpoint.
    async fn confirm_oldest(&mut self) -> Result<(), PlanError> {
        let Some(oldest) = self.pending.pop_front() else {
            return Ok(());
        };
        oldest.confirm.wait().await?;
        self.deps
            .progress
            .checkpoint(
                &self.job.export_id,
                oldest.field,
                oldest.index + 1,
                oldest.end_line,
                now_ms(),
            )
            .await?;
        audience_export_core::crash_point("producer::checkpointed");
        Ok(())
    }

    /// Flushes the partial shards (unless the export was stopped or `flush` is false: a plan
    /// that failed mid-way keeps only what was published) and waits until the broker confirmed
    /// every shard. Returns each field's totals.
    pub async fn finish(mut self, flush: bool) -> Result<BTreeMap<Field, FieldTotals>, PlanError> {
        let fields: Vec<Field> = self.fields.keys().copied().collect();
        for field in fields {
            if flush && self.stopped.is_none() {
                self.flush(field).await?;
            }
        }
        while !self.pending.is_empty() {
            self.confirm_oldest().await?;
        }
        Ok(self
            .fields
            .into_iter()
            .map(|(field, state)| (field, state.totals))
            .collect())
    }
}
