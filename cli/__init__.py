"""`raven`: a command-line client of the gRPC API, and the local development stack."""

import os

# gRPC core logs connection failures to stderr in its own format; the CLI says what went
# wrong itself. Set before anything imports grpc, and only when the user has not.
if not os.environ.get("GRPC_VERBOSITY"):
    os.environ["GRPC_VERBOSITY"] = "NONE"
