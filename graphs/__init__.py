"""CUDA-graph capture and replay mechanism (imports only torch)."""
