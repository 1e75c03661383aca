//! Rebuilds the crate when a migration is added or changed: `sqlx::migrate!` embeds the
//! `migrations/` files at compile time, and Cargo does not otherwise know that the crate depends
//! on them, so a new migration could be left out of a build that compiled before it existed.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
