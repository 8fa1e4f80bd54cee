fn main() {} // replaced by the ratelimit benchmark
