//! Whole training runs on loopback rings: the strategies' steps against one
//! machine's, survivors and rejoiners, parameter servers, checkpoints.
//!
//! One test binary (the modules below) so the workspace links burn once for them.

mod common;
mod elastic;
mod run;
mod split;
mod strategies;
mod travel;
