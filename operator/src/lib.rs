//! WhaleFlux operator library: the planner and the command-line tools built on it, shared by the
//! `whaleflux` binary and the tests.

pub mod controller;
pub mod local;
pub mod plan_cmd;
pub mod planner;
pub mod resources;
pub mod status;
