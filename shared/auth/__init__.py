"""Service identity and authorization: mTLS transport, caller identity (SPIFFE ids,
trusted-proxy forwarding, end-user JWTs), the permission table, the policy file, audit.

`admission.build_admission` is what a composition root calls; servicers only use
`shared.identity`. The package itself imports nothing, so that its pure parts
(policy, permissions, SPIFFE ids) load without grpc or SQLAlchemy.
"""
