"""gRPC stubs and messages of deft.v1, generated from proto/deft/v1 at build time (setup.py)."""
