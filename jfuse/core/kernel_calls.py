"""Which kernels a lowered program runs: counted from its StableHLO text.

A kernel is a custom call (``tpu_custom_call`` for Mosaic TPU, the Triton or Mosaic GPU call
targets on CUDA, and cuDNN's flash attention, which jfuse's attention op calls on GPU). Counting
them tells what really runs: zero on CPU or where every kernel declined. Used by ``jfuse.jit``'s
compile fallback, the benchmarks and the tests; it knows nothing else of jfuse.
"""

from __future__ import annotations

import re

# Custom-call targets of kernels in lowered StableHLO: Mosaic TPU; Triton and Mosaic GPU; cuDNN's
# flash attention forward and backward as jfuse emits them (no bias, no dropout: JAX names those
# variants differently).
KERNEL_CALL_TARGETS = {
    "tpu_custom_call": "pallas-mosaic",
    "__gpu$xla.gpu.triton": "pallas-triton",
    "mosaic_gpu_v2": "pallas-mosaic-gpu",
    "mosaic_gpu": "pallas-mosaic-gpu",
    "__cudnn$fmhaSoftmax": "cudnn-fmha",
    "__cudnn$fmhaSoftmaxBackward": "cudnn-fmha-backward",
}
_KERNEL_CALL = re.compile(
    r"custom_call\s*@({})(?=\()".format("|".join(map(re.escape, KERNEL_CALL_TARGETS)))
)


_FUNCTION = re.compile(r'func\.func\s+(?:public|private)\s+@("[^"]+"|[\w$.-]+)\(')
_CALL = re.compile(r'(?<![\w.])(?:func\.)?call\s+@("[^"]+"|[\w$.-]+)\(')


def kernel_calls(lowered_text: str) -> dict[str, int]:
    """Kernel calls one run of a lowered program makes, by kind (``{"pallas-triton": 2}``).

    Empty means the program runs XLA's ops alone: on CPU, or where every kernel declined. A
    kernel inside a private function counts once per call of that function (jfuse emits repeated
    fused blocks as one shared function).
    """
    starts = [(m.start(), m.group(1)) for m in _FUNCTION.finditer(lowered_text)]
    if not starts:
        starts = [(0, "main")]
    bodies = {name: lowered_text[begin:end]
              for (begin, name), (end, _) in zip(starts, starts[1:] + [(len(lowered_text), "")])}
    memo: dict[str, dict[str, int]] = {}

    def runs(name: str, depth: int = 0) -> dict[str, int]:
        if name not in memo:
            counts: dict[str, int] = {}
            body = bodies.get(name, "")
            for target in _KERNEL_CALL.findall(body):
                kind = KERNEL_CALL_TARGETS[target]
                counts[kind] = counts.get(kind, 0) + 1
            for callee in _CALL.findall(body):
                if depth < 64:
                    for kind, n in runs(callee, depth + 1).items():
                        counts[kind] = counts.get(kind, 0) + n
            memo[name] = counts
        return memo[name]

    return runs("main" if "main" in bodies else starts[0][1])
