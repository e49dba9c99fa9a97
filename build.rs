//! Rebuilds the crate when a migration in `sql/` is added or changed:
//! `refinery::embed_migrations!` reads the directory at compile time but
//! does not tell cargo to watch it, so a new migration would otherwise be
//! missing from an incremental build.

fn main() {
    println!("cargo:rerun-if-changed=sql");
}
