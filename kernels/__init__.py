"""Triton kernels of tritondeconv (shipped as ``tritondeconv.kernels``)."""
