//! The v2 inference protocol's gRPC messages, server and client, generated from
//! `proto/inference.proto`.

tonic::include_proto!("inference");
