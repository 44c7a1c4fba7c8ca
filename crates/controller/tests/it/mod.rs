mod bad_input;
mod binary;
mod common;
mod grpc_flow;
mod http_flow;
mod queue;
mod reconciler;
