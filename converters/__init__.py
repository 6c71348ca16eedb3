"""dit8.converters: offline conversion of Wan2.1 DiT checkpoints to the dit8 packed format.

One module per job: `convert` (the streaming pass), `quantize_weights` (the per-channel recipe and its
error), `lora` (LoRA merge) and `lora_formats` (how LoRA files name their tensors and alpha), `source`
(reading and digesting the source), `in_order` (the helper threads that hash and write while the next
block is quantized), `safetensors_writer` (streaming output), `work_folder` (the folder beside DST the
output is built in), `errors` (ConvertError), `cli`. The packed format itself (names, metadata, version
check) is `dit8.packed_format`, shared with the loader.
"""

from .convert import ConvertError, ConvertResult, LayerError, convert
from dit8.packed_format import FORMAT_NAME, FORMAT_VERSION, check_format_version, scheme_of
from .lora import LoraSet, LoraSpec, parse_lora
from .quantize_weights import dequantize_weight, quantization_error, quantize_weight
from .safetensors_writer import SafetensorsWriter, TensorSpec

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "ConvertError", "ConvertResult", "LayerError", "LoraSet", "LoraSpec",
    "SafetensorsWriter", "TensorSpec", "check_format_version", "convert", "dequantize_weight", "parse_lora",
    "quantization_error", "quantize_weight", "scheme_of",
]
