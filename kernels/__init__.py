"""Triton kernels of lowbit-engine, installed as ``lowbit_engine.kernels``.

Each kernel module registers itself with :mod:`lowbit_engine.ops` as a backend of an op. Importing this
package never requires a GPU; without Triton it is empty.
"""

try:
    import triton  # noqa: F401  (only probed: the kernel modules import it themselves)
except ImportError:  # no Triton: no Triton backends; the CUDA, CPU and torch backends still serve every op
    triton = None

if triton is not None:
    # Imported only when Triton is present, outside the try, so a real error in a kernel module is
    # raised rather than mistaken for "Triton is missing".
    from . import gemm_w4a4

    gemm_w4a4.register()

    from . import vq_gemm

    vq_gemm.register()
