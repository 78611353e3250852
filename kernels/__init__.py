"""Triton kernels of lowbit-engine, installed as ``lowbit_engine.kernels``.

Each kernel module registers itself with :mod:`lowbit_engine.ops` as a backend of an op. Importing this
package never requires a GPU; without Triton it is empty.
"""
