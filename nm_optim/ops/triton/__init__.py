"""The Triton backend: kernels.py (device code) and launch.py (host code). Imported only when
backend="triton" is used, so nm_optim never needs Triton to import."""
