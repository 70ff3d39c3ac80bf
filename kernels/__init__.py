"""Triton kernels, each with a plain-torch twin (imports only torch and triton)."""
