//! The end-to-end harness of audience-export: the Graph API emulator, an SMTP sink, a
//! deterministic segment generator, and `spawn_app`, which runs the real producer, worker and
//! finalizer loops in-process against the real RabbitMQ and Redis under a fresh namespace.

pub mod api;
pub mod app;
pub mod cluster;
pub mod emulator;
pub mod fault;
pub mod logs;
pub mod s3;
pub mod segment;
pub mod smtp;
