//! Cairn's benchmark harness: generates repositories, starts Cairn and the
//! baseline (nginx + fcgiwrap + `git http-backend`) on this machine, runs the
//! same git workloads against each and reports Cairn/baseline ratios.
//!
//! The binary (`cairn-bench`) drives the run; this library holds the parts
//! that stand alone.

pub mod baseline;
pub mod procs;
pub mod repogen;
