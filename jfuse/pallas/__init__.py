"""jfuse's Pallas kernels: one module per fused op, each with a Mosaic (TPU) and a Triton (GPU)
kernel and ``*_unsupported_reason`` functions saying, without tracing, what each cannot serve.

* :mod:`~jfuse.pallas.matmul`: the matmul-epilogue kernel, ``epilogue(x @ W_1 [+ b_1], ...,
  x @ W_n [+ b_n])``, that every matmul-shaped op shares; :mod:`~jfuse.pallas.linear` and
  :mod:`~jfuse.pallas.glu` are its epilogues and default tiles (glu also its GPU
  profitability rule).
* :mod:`~jfuse.pallas.norm`: RMSNorm and LayerNorm over whole rows, with the residual add.
* ``_tiling`` (block shapes, VMEM budget, Triton masks) and ``_common`` (refusal reasons, the
  in-kernel f32 dot, activations per backend) hold what every kernel module follows.

Kernels take 2-D arrays and know nothing of jaxprs, autodiff or meshes; this package imports
nothing from ``jfuse.ops``, ``passes``, the rewriter or ``api`` (only :mod:`jfuse.core`).
"""
