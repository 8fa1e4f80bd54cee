fn main() {} // replaced by the hedge benchmark
