"""Triton kernels. Nothing here knows about modules, autograd or grids: see ``triton_bn/backends/triton_kernels.py``."""
