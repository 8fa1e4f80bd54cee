fn main() {} // replaced by the heartbeat benchmark
