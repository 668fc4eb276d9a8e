//! Active health checks: TCP connect or `grpc.health.v1.Health/Check`, with consecutive
//! thresholds before a backend flips between ready and not ready.

pub mod grpc;
