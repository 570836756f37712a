"""Generated gRPC code for protos/ (run `make proto`); import from `shared.proto.raven.training.v1`."""
