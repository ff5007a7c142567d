//! Reefline's operator tools, apart from the services and the wire contract: the local Schema
//! Registry (`reefline-registry`) and the dead-letter replay (`reefline-replay`).

pub mod registry;
pub mod replay;
