//! `throughput`: P publishers spread over R rooms (R = 1 for the single-room variant), each with
//! W sends in flight, as fast as the acks allow. Measures committed messages/s and ack latency;
//! a subscriber per room (by default) checks that every commit is also delivered.

use anyhow::{ensure, Result};
use serde_json::json;

use super::publish::{self, Plan};
use super::Ctx;
use crate::cli::Throughput;
use crate::report::Report;

pub async fn run(ctx: &Ctx, args: &Throughput) -> Result<Report> {
    ensure!(
        args.rooms > 0 && args.publishers > 0,
        "--rooms and --publishers must be positive"
    );
    let plan = Plan {
        scenario: "throughput",
        params: json!({
            "rooms": args.rooms,
            "publishers": args.publishers,
            "window": args.window,
            "subscribers_per_room": args.subscribers,
            "pad": args.pad,
            "duration_secs": ctx.duration.as_secs_f64(),
        }),
        rooms: args.rooms,
        subscribers_per_room: args.subscribers,
        publishers: args.publishers,
        window: args.window.max(1),
        interval: None,
        pad: args.pad,
    };
    publish::run(ctx, plan).await
}
