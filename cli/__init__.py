"""`raven`: a command-line client of the gRPC API, and the local development stack."""
