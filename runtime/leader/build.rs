//! `sqlx::migrate!` embeds the migrations at compile time but does not tell cargo to watch the
//! directory, so a new migration file alone would not rebuild the tests that embed them.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
