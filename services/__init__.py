"""Services of the training backbone: one gRPC server per folder, and the CLI."""
