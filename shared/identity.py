"""Who is calling: the identity recorded on what a call changes."""

from __future__ import annotations

import grpc

ANONYMOUS = "anonymous"


def caller_identity(context: grpc.aio.ServicerContext) -> str:
    """The SPIFFE id of a verified client certificate, else "anonymous"."""
    auth = context.auth_context()
    for uri in auth.get("x509_subject_alternative_name", []):
        text = uri.decode()
        if text.startswith("spiffe://"):
            return text
    common_names = auth.get("x509_common_name", [])
    return common_names[0].decode() if common_names else ANONYMOUS
