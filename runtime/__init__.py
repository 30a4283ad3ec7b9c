"""itera_runtime: run an exported itera bundle with onnxruntime; no torch needed.

    from itera_runtime import Generator, SamplingConfig

    gen = Generator("bundle")                      # verifies every file's sha256 first
    print(gen.generate("To be", max_new_tokens=32).text)
    for piece in gen.generate("To be", sampling=SamplingConfig(temperature=0.8, seed=1)):
        print(piece, end="", flush=True)           # streamed, never a split UTF-8 character
    print(gen.last_stats.summary())                # ttft, prefill/decode tokens/s, peak RSS

The command line is `itera-run BUNDLE --prompt "To be"` (see `itera_runtime.cli`).
"""

from .bundle import Bundle, BundleError, load_bundle
from .generate import Generation, GenerationStats, Generator
from .sampling import SamplingConfig
from .options import DeviceError

__all__ = [
    "Generator",
    "Generation",
    "GenerationStats",
    "SamplingConfig",
    "load_bundle",
    "Bundle",
    "BundleError",
    "DeviceError",
]
