//! Controller integration tests: real servers on loopback port 0, real SQLite, real HTTP and
//! gRPC clients. One test binary (faster to link); modules by topic.

mod it;
