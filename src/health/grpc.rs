//! The `grpc.health.v1.Health/Check` probe.
