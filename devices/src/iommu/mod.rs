//! Virtual IOMMUs.

pub mod vtd;
