"""The names the API's settings choose among, which the command line offers as choices.

Kept free of torch (and of everything else heavy): `dit8 --help` and argument errors build their parser
from these without loading torch. The modules that use them (`packed_format`, `sampler`, `pipeline`,
`dit8.kernels.registry`, `dit8.kernels.attention`) import them from here.
"""

# The DiT's block linear weights: the 8-bit schemes of the packed format, and the float weights.
QUANT_SCHEMES = ("fp8", "int8")
SCHEMES = ("bf16",) + QUANT_SCHEMES  # "bf16": the float weights (of a model folder: its float DiT)

# The two rules LightX2V has used to move from x0 to the next noise level.
DETERMINISTIC, RENOISE = "deterministic", "renoise"
UPDATE_RULES = (DETERMINISTIC, RENOISE)

# The pipeline's samplers: the distilled models' few-step one and the base model's UniPC.
DISTILLED, UNIPC = "distilled", "unipc"
SAMPLERS = (DISTILLED, UNIPC)

# Preference order of the kernels' "auto": hand-written CUDA, then Triton, then the torch reference.
BACKENDS = ("cuda", "triton", "torch")

# Self-attention precisions: bf16, or the 8-bit paths.
PRECISIONS = ("bf16", "int8", "fp8")
