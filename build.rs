//! Rebuilds flowgate when a migration is added or changed: `sqlx::migrate!` embeds the
//! `migrations` directory in the binary, and cargo would otherwise rebuild only when a Rust
//! file changes, shipping a binary without the new migration.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
