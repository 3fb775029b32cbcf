"""Triton kernels: fused fast paths of the PyTorch reference code.

Each kernel here has a PyTorch reference elsewhere in var_rt (named in its docstring) and a CPU test
that runs it under ``TRITON_INTERPRET=1`` against that reference. Triton is optional at run time:
callers fall back to the reference when it is not installed or the tensors are not on a GPU.
"""
