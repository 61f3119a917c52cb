//! Pack replication: moving packs between nodes (`transfer`), putting a
//! committed push's pack in place on each replica (`placer`), and expiring
//! staged packs nobody committed (`staging_cleanup`).

pub mod placer;
pub mod staging_cleanup;
pub mod transfer;
