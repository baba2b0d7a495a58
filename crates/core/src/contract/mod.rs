//! Versioned JSON contracts between the upstream platform, the producer, the workers and the
//! finalizer. Every type here is serialised on the wire; changing a field is a contract change and
//! belongs in `docs/ARCHITECTURE.md`. This module never performs I/O.

mod event;
mod field;
mod ids;
mod job;
pub mod schema;
mod shard;

pub use event::{
    AudienceReport, ConnectionStatus, Event, ExportStatus, FinishedReport, LookalikeReport,
};
pub use field::Field;
pub use ids::{AdAccountId, ExportId, IdError, PhoneCountry, WorkspaceId};
pub use job::{
    looks_like_email, Compression, Consent, ExportJob, JobError, Lookalike, Notify, Segment,
    Source, SourceFormat, CONTRACT_VERSION, DO_NOT_SELL_OR_SHARE, MAX_ATTRIBUTE_LEN,
};
pub use shard::{shard_key, FollowUp, Shard, FOLLOW_UP, MESSAGE_KIND_HEADER};
