"""The trainer worker: takes training jobs from JetStream and trains them with MMDetection."""

import os

# gRPC core writes its own lines to stderr, outside the structured logs: only its errors,
# unless GRPC_VERBOSITY says otherwise. Read once, when grpc is first imported: set here,
# before any module of the process imports it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
