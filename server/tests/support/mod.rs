pub mod cluster;
pub mod postgres;
pub mod redis;
pub mod scenario;
pub mod server;
pub mod ws;
