"""Frozen biological encoders and their on-disk feature cache.

An :class:`Encoder` turns one payload *item* into per-position features ``[positions, hidden]``. Items are
what one prompt placeholder stands for: each sequence of a ``dna`` / ``protein`` payload (a str or a tuple
of str), or one whole ``cell`` payload (``{"genes": [...], "values": [...]}``). The fused policy
(models/fusion.py) only calls :meth:`Encoder.items`, :meth:`Encoder.num_positions` and
:meth:`Encoder.encode`, so any model fits behind it without changes to stages:

- :class:`TransformersEncoder`: ESM-2 (``facebook/esm2_*``), Nucleotide Transformer checkpoints in ESM format,
  the built-in ``tiny-dna`` / ``tiny-protein`` (models/tiny_encoders.py), or any ``AutoModel`` + tokenizer by
  hub id or local path. Features are the hidden states of the chosen layer at every attended position.
- :class:`~biopost.models.cell_encoder.CellEncoder` (every ``cell`` encoder): a BERT-family model over a cell's
  rank-value gene tokens (Geneformer by hub id or local path, or the built-in ``tiny-cell``).
- Encoders outside transformers (Evo2 through the ``evo2`` package, ESM3 / ESM C through ``esm``): subclass :class:`Encoder` and register a builder
  for a name scheme, then configure ``name: "<scheme>:<model id>"``::

      @register_encoder("evo2")
      def load_evo2(cfg, modality, device, dtype):
          return Evo2Encoder(cfg.name.split(":", 1)[1], cfg.layer, cfg.max_length, device, dtype)

  ``identity`` must change whenever the features would (weights, layer, length, dtype): it keys the cache.

Encoders are frozen: no gradients, eval mode, weights never written. :class:`FeatureCache` keeps each item's
features on disk under (encoder identity, sequence hash); files are written to a temporary name and renamed,
so concurrent runs share the cache without ever reading a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

import torch

ENCODER_BUILDERS: dict[str, Callable] = {}


class Encoder(ABC):
    """A frozen model giving per-position features for payload items of one modality."""

    modality: str
    hidden_size: int
    identity: str  # changes whenever the features would: the feature cache's key

    def __deepcopy__(self, memo):  # frozen: a copied policy (e.g. RL's reference) shares its encoders
        return self

    def items(self, payload: Any) -> list:
        """The items of one example's payload, one prompt placeholder each (in payload order)."""
        return payload_items(payload)

    def to(self, device) -> "Encoder":
        """Run on ``device`` (encoders outside transformers place themselves: no-op by default)."""
        return self

    def item_key(self, item: Any) -> str:
        """Text that identifies an item (hashed for the cache)."""
        return item if isinstance(item, str) else json.dumps(item, sort_keys=True, default=str)

    @abstractmethod
    def num_positions(self, item: Any) -> int:
        """Rows :meth:`encode` returns for ``item`` (known without running the model)."""

    @abstractmethod
    def encode(self, items: list) -> list[torch.Tensor]:
        """Features of each item, ``[num_positions(item), hidden_size]``, detached."""


def payload_items(payload: Any) -> list:
    """Each sequence of a str / tuple payload; a cell payload (a dict) is one item.

    >>> payload_items(("ACGT", "ACGA")), payload_items("MKV"), payload_items({"genes": ["CD3E"]}), payload_items(None)
    (['ACGT', 'ACGA'], ['MKV'], [{'genes': ['CD3E']}], [])
    """
    if payload is None:
        return []
    return list(payload) if isinstance(payload, (tuple, list)) else [payload]


def register_encoder(scheme: str):
    """Register ``builder(cfg, modality, device, dtype) -> Encoder`` for names written ``scheme:<id>``."""

    def wrap(builder):
        ENCODER_BUILDERS[scheme] = builder
        return builder

    return wrap


def cell_encoder_source(cfg) -> str | Path | None:
    """Where a rank-value cell encoder loads from (a built tiny encoder's directory, else its configured path or hub
    id), the median dictionary there too; None for an encoder built by name (``ENCODER_BUILDERS``), which reads none."""
    from biopost.models.tiny_encoders import TINY_ENCODERS, tiny_encoder_path

    if cfg.name.partition(":")[0] in ENCODER_BUILDERS:
        return None
    return tiny_encoder_path(cfg.name) if cfg.name in TINY_ENCODERS else cfg.name


def load_encoder(cfg, modality: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Encoder:
    """The encoder a ``model.encoders.<modality>`` config names, frozen, on ``device`` in ``dtype``."""
    from biopost.models.tiny_encoders import TINY_ENCODERS, tiny_encoder_path

    scheme, _, rest = cfg.name.partition(":")
    if cfg.name in TINY_ENCODERS and TINY_ENCODERS[cfg.name]["modality"] != modality:
        raise ValueError(f"model.encoders.{modality}: {cfg.name} reads {TINY_ENCODERS[cfg.name]['modality']}, "
                         f"not {modality}")
    source = tiny_encoder_path(cfg.name) if cfg.name in TINY_ENCODERS else cfg.name
    if rest and scheme in ENCODER_BUILDERS:
        encoder = ENCODER_BUILDERS[scheme](cfg, modality, device, dtype)
    elif modality == "cell":
        from biopost.models.cell_encoder import CellEncoder, gene_tokenizer_for

        encoder = CellEncoder(source, gene_tokenizer_for(cfg, source), cfg.layer, device, dtype,
                              revision=cfg.revision, batch_size=cfg.batch_size,
                              trust_remote_code=cfg.trust_remote_code)
    elif cfg.name in TINY_ENCODERS:
        encoder = TransformersEncoder(source, modality, cfg.layer, cfg.max_length, device, dtype,
                                      batch_size=cfg.batch_size)
    else:
        encoder = TransformersEncoder(cfg.name, modality, cfg.layer, cfg.max_length, device, dtype,
                                      trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                                      batch_size=cfg.batch_size)
    return FeatureCache(encoder) if cfg.cache else encoder


class TransformersEncoder(Encoder):
    """Hidden states of one layer of a transformers encoder, one row per attended token (special tokens included)."""

    def __init__(self, source: str | Path, modality: str, layer: int = -1, max_length: int = 512,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                 trust_remote_code: bool = False, revision: str | None = None, batch_size: int = 16):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        source = str(source)
        with loading_errors(source, "encoder", "a built-in encoder (tiny-dna, tiny-protein)",
                            "set trust_remote_code: true for it", trust_remote_code):
            self.tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
            config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
            # MaskedLM checkpoints load into their base model: the MLM head is dropped, no pooler is added
            pooler = {"add_pooling_layer": False} if config.model_type in ("esm", "bert", "roberta") else {}
            self.model = AutoModel.from_pretrained(source, config=config, revision=revision,
                                                   trust_remote_code=trust_remote_code, dtype=dtype, **pooler)
        self.model.requires_grad_(False).eval().to(device)
        self.modality, self.layer, self.max_length, self.batch_size = modality, layer, max_length, batch_size
        self.hidden_size = self.model.config.hidden_size
        n_states = self.model.config.num_hidden_layers + 1  # embeddings, then each layer
        if not -n_states <= layer < n_states:
            raise ValueError(f"encoder {source}: layer {layer} out of range; it has hidden states 0..{n_states - 1}")
        version = getattr(self.model.config, "_commit_hash", None) or revision or _local_version(source)
        self.identity = hashlib.sha256(json.dumps(
            [source, version, layer % n_states, max_length, str(dtype)]).encode()).hexdigest()[:20]

    def num_positions(self, item: str) -> int:
        return len(self._tokenize([item])["input_ids"][0])

    def _tokenize(self, items: list[str], **kwargs):
        return self.tokenizer(items, truncation=True, max_length=self.max_length, **kwargs)

    @torch.no_grad()
    def to(self, device) -> "TransformersEncoder":
        self.model.to(device)
        return self

    def encode(self, items: list[str]) -> list[torch.Tensor]:
        out = []
        for start in range(0, len(items), self.batch_size):
            # right padding: real tokens keep their positions; padded keys are masked out of attention
            batch = self._tokenize(items[start : start + self.batch_size], padding=True, return_tensors="pt")
            batch = {k: v.to(self.model.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            states = self.model(**batch, output_hidden_states=True).hidden_states[self.layer]
            lengths = batch["attention_mask"].sum(1).tolist()
            out += [states[i, :n].detach() for i, n in enumerate(lengths)]
        return out


@contextlib.contextmanager
def loading_errors(source: str, what: str, builtin: str, trust_fix: str, trust_remote_code: bool) -> Iterator[None]:
    """Around the transformers calls that load encoder ``source``: a local path without ``config.json``, a source
    that cannot be read, and a model running its own code untrusted each become a one-line error with its fix.
    ``what`` names the kind of encoder, ``builtin`` the built-in alternative, ``trust_fix`` the setting to trust."""
    looks_local = source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()
    if looks_local and not (Path(source).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"no {what} at {source}: expected a transformers model directory (config.json)")
    try:
        yield
    except OSError as err:
        raise FileNotFoundError(f"could not load {what} {source!r} ({err.__class__.__name__}): give a local model "
                                f"directory, a reachable hub id, or {builtin}") from None
    except ValueError as err:
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise ValueError(f"{what} {source!r} runs its own code: {trust_fix} if you trust it") from None
        raise


def _local_version(source: str) -> str:
    """Names, sizes and modification times of a local model's files (a changed file changes the cache key)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return ""
    return json.dumps(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()))


class FeatureCache(Encoder):
    """An encoder whose features are computed once per item and kept on disk (atomic writes, shared by runs)."""

    def __init__(self, encoder: Encoder, root: Path | None = None):
        from biopost.models.backbones import cache_dir

        self.encoder = encoder
        self.modality, self.hidden_size, self.identity = encoder.modality, encoder.hidden_size, encoder.identity
        self.root = Path(root) if root is not None else cache_dir() / "features" / encoder.identity

    def items(self, payload):
        return self.encoder.items(payload)

    def to(self, device) -> "FeatureCache":
        self.encoder.to(device)
        return self

    def item_key(self, item) -> str:
        return self.encoder.item_key(item)

    def num_positions(self, item) -> int:
        return self.encoder.num_positions(item)

    def path_of(self, item) -> Path:
        digest = hashlib.sha256(self.item_key(item).encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.safetensors"

    def encode(self, items: list) -> list[torch.Tensor]:
        from safetensors.torch import load_file

        paths = [self.path_of(item) for item in items]
        missing = {}
        for item, path in zip(items, paths):
            if path not in missing and not path.is_file():
                missing[path] = item
        if missing:
            for path, features in zip(missing, self.encoder.encode(list(missing.values()))):
                write_atomically(path, features)
        device = getattr(getattr(self.encoder, "model", None), "device", "cpu")
        return [load_file(path, device=str(device))["features"] for path in paths]


def write_atomically(path: Path, features: torch.Tensor) -> None:
    """Write to a unique temporary name in the same folder, then rename: readers see all or nothing."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    save_file({"features": features.contiguous().cpu()}, tmp)
    os.replace(tmp, path)
