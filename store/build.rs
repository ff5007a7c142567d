fn main() {
    // The migrations are embedded by `sqlx::migrate!`: build again when they change.
    println!("cargo:rerun-if-changed=migrations");
}
