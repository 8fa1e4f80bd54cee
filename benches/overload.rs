//! The overload benchmark (being written).
fn main() {}
