//! `fanout`: R rooms x S subscribers spread over the nodes, P publishers at a total rate of M
//! messages a second. Measures deliveries/s and the end-to-end latency at a given load; the
//! latency target of the suite is this scenario at 10 rooms x 50 subscribers, 200 msgs/s.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::json;

use super::publish::{self, Plan};
use super::Ctx;
use crate::cli::Fanout;
use crate::report::Report;

pub async fn run(ctx: &Ctx, args: &Fanout) -> Result<Report> {
    ensure!(
        args.rooms > 0 && args.subscribers > 0,
        "--rooms and --subscribers must be positive"
    );
    ensure!(
        args.publishers > 0 && args.rate > 0.0,
        "--publishers and --rate must be positive"
    );
    let per_publisher = args.rate / args.publishers as f64;
    let plan = Plan {
        scenario: "fanout",
        params: json!({
            "rooms": args.rooms,
            "subscribers_per_room": args.subscribers,
            "publishers": args.publishers,
            "rate": args.rate,
            "window": args.window,
            "pad": args.pad,
            "duration_secs": ctx.duration.as_secs_f64(),
        }),
        rooms: args.rooms,
        subscribers_per_room: args.subscribers,
        publishers: args.publishers,
        window: args.window.max(1),
        interval: Some(Duration::from_secs_f64(1.0 / per_publisher)),
        pad: args.pad,
    };
    publish::run(ctx, plan).await
}
