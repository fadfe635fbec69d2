"""A cell read the way Geneformer reads it: rank-value gene tokens through a BERT-family encoder.

Rank-value encoding (Theodoris et al., Nature 2023): for one cell, each expressed gene's value is divided by
that gene's **non-zero median over a reference corpus of cells** (the median of its expression across the
corpus cells that express it). Dividing by the median lifts genes that are usually low but high in this
cell (transcription factors) above ubiquitous housekeeping genes. Genes are then ordered by the normalised
value, highest first, mapped to token ids through the encoder's gene-token dictionary, and truncated to
``max_length`` tokens (``<cls>`` first and ``<eos>`` last when the dictionary has both, as Geneformer's
95M-parameter models expect). Genes the dictionaries do not know are dropped and counted (:meth:`GeneTokenizer.unmatched`).

The reference corpus is, in order of preference: a median dictionary the user supplies (a real Geneformer
checkpoint comes with the one it was trained with), the one saved beside the encoder (``tiny-cell``), or the
run's training cells (:func:`gene_medians`). Geneformer normalises raw counts by library size first; biopost
reads whatever the task's ``values`` hold (log-normalised for the embedded PBMC data), so the order is the
same within a corpus but the medians of two corpora are only comparable on the same scale.

Dictionaries are files: JSON objects, two-column TSV / CSV, or Geneformer's pickled dicts (read by a
restricted unpickler that builds only dicts, strings and numbers, never arbitrary objects). Geneformer keys
its dictionaries by Ensembl id; data holding gene symbols needs a symbol -> Ensembl map (``gene_symbols``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from biopost.models.encoders import Encoder, _local_version, loading_errors

TOKENS_FILE, MEDIANS_FILE = "gene_tokens.json", "gene_medians.json"
SPECIAL = ("<pad>", "<mask>", "<cls>", "<eos>")
MAX_UNMATCHED = 0.5  # a run whose dictionaries miss more of its expressed genes than this is misconfigured


class _DictUnpickler(pickle.Unpickler):
    """Builds only what pickle encodes natively (dict, str, int, float...): any class reference is refused, so a
    crafted file cannot run code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a dictionary file may hold only dicts, strings "
                                     "and numbers (convert it to JSON)")


def read_mapping(path: str | Path, value_type: type, what: str) -> dict:
    """A ``{key: value}`` file: ``.json``, ``.tsv`` / ``.csv`` (two columns, a header row is skipped when its
    value does not parse), or ``.pkl`` / ``.pickle`` (restricted). Values are cast to ``value_type``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        raw = json.loads(path.read_text())
    elif suffix in (".pkl", ".pickle"):
        raw = _DictUnpickler(io.BytesIO(path.read_bytes())).load()
    elif suffix in (".tsv", ".csv", ".txt"):
        delimiter = "," if suffix == ".csv" else "\t"
        rows = [r for r in csv.reader(path.read_text().splitlines(), delimiter=delimiter) if r]
        if rows and len(rows[0]) >= 2 and not _parses(rows[0][1], value_type):
            rows = rows[1:]
        raw = {r[0]: r[1] for r in rows}
    else:
        raise ValueError(f"{what} file {path.name}: use .json, .tsv, .csv or .pkl")
    if not isinstance(raw, dict):
        raise ValueError(f"{what} file {path.name} holds a {type(raw).__name__}, not a mapping")
    try:
        return {str(k): value_type(v) for k, v in raw.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} file {path.name}: a value is not {value_type.__name__} ({err})") from None


def _parses(text: str, value_type: type) -> bool:
    try:
        value_type(text)
        return True
    except ValueError:
        return False


def gene_medians(cells: Iterable[dict]) -> dict[str, float]:
    """Each gene's median value over the cells that express it (zeros and absent genes do not count).

    >>> gene_medians([{"genes": ["A", "B"], "values": [4.0, 1.0]}, {"genes": ["A"], "values": [2.0]},
    ...               {"genes": ["A", "B"], "values": [0.0, 3.0]}])
    {'A': 3.0, 'B': 2.0}
    """
    seen: dict[str, list[float]] = {}
    for cell in cells:
        for gene, value in zip(cell["genes"], cell["values"]):
            if value > 0:
                seen.setdefault(gene, []).append(float(value))
    return {gene: float(np.median(values)) for gene, values in sorted(seen.items())}


class GeneTokenizer:
    """Cells -> rank-value token ids (see the module docstring), with Geneformer's dictionaries or ours."""

    def __init__(self, token_ids: dict[str, int], medians: dict[str, float], max_length: int,
                 symbols: dict[str, str] | None = None):
        if "<pad>" not in token_ids:
            raise ValueError("the gene-token dictionary has no <pad> token")
        self.token_ids, self.medians, self.symbols, self.max_length = token_ids, medians, symbols or {}, max_length
        self.special = "<cls>" in token_ids and "<eos>" in token_ids
        self.pad_id = token_ids["<pad>"]

    def gene_key(self, gene: str) -> str:
        return self.symbols.get(gene, gene)

    def known(self, gene: str) -> bool:
        key = self.gene_key(gene)
        return key in self.token_ids and self.medians.get(key, 0) > 0 and key not in SPECIAL

    def __call__(self, cell: dict) -> list[int]:
        """Token ids of one cell: genes by value / reference median, highest first (stable: ties keep the
        cell's own order), truncated to ``max_length`` tokens in all.

        >>> tok = GeneTokenizer({"<pad>": 0, "<mask>": 1, "A": 2, "B": 3, "C": 4}, {"A": 4.0, "B": 1.0, "C": 2.0}, 8)
        >>> tok({"genes": ["A", "B", "C", "D"], "values": [4.0, 2.0, 1.0, 9.0]})  # B: 2/1 > A: 4/4 > C: 1/2; D unknown
        [3, 2, 4]
        >>> with_special = GeneTokenizer({**tok.token_ids, "<cls>": 5, "<eos>": 6}, tok.medians, 3)
        >>> with_special({"genes": ["A", "B"], "values": [4.0, 2.0]})  # <cls> B <eos>: 3 tokens in all
        [5, 3, 6]
        """
        pairs = [(self.gene_key(g), v) for g, v in zip(cell["genes"], cell["values"]) if v > 0 and self.known(g)]
        ranked = sorted(range(len(pairs)), key=lambda i: -pairs[i][1] / self.medians[pairs[i][0]])
        room = self.max_length - 2 if self.special else self.max_length
        ids = [self.token_ids[pairs[i][0]] for i in ranked[:room]]
        return [self.token_ids["<cls>"], *ids, self.token_ids["<eos>"]] if self.special else ids

    def matched(self, cell: dict) -> int:
        """How many of ``cell``'s expressed genes it reads (0: the cell would be only ``<cls> <eos>``)."""
        return sum(1 for g, v in zip(cell["genes"], cell["values"]) if v > 0 and self.known(g))

    def unmatched(self, cells: Iterable[dict]) -> list[str]:
        """Distinct genes expressed in ``cells`` that have no token or no reference median (they are dropped)."""
        return sorted({g for c in cells for g, v in zip(c["genes"], c["values"]) if v > 0 and not self.known(g)})

    def fingerprint(self) -> str:
        blob = json.dumps([self.token_ids, self.medians, self.symbols, self.max_length], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def gene_tokenizer_for(cfg, source: str | Path, medians: dict[str, float] | None = None) -> GeneTokenizer:
    """The tokenizer a ``model.encoders.cell`` config describes: its dictionary files, else the ones saved in
    the encoder's directory; ``medians`` (the run's training cells) when neither gives a median dictionary."""
    folder = Path(source).expanduser()
    tokens_file = cfg.gene_tokens or (folder / TOKENS_FILE if (folder / TOKENS_FILE).is_file() else None)
    if tokens_file is None:
        raise FileNotFoundError(f"cell encoder {cfg.name}: no gene-token dictionary; set model.encoders.cell."
                                f"gene_tokens to the file the model was trained with (json, tsv or pkl)")
    medians_file = cfg.gene_medians or (folder / MEDIANS_FILE if (folder / MEDIANS_FILE).is_file() else None)
    if medians_file is not None:
        medians = read_mapping(medians_file, float, "gene median")
    elif medians is None:
        raise FileNotFoundError(f"cell encoder {cfg.name}: no gene median dictionary; set model.encoders.cell."
                                "gene_medians (or train through the pipeline, which uses the training cells)")
    symbols = read_mapping(cfg.gene_symbols, str, "gene symbol") if cfg.gene_symbols else None
    return GeneTokenizer(read_mapping(tokens_file, int, "gene token"), medians, cfg.max_length, symbols)


def has_medians(cfg, source: str | Path) -> bool:
    return bool(cfg.gene_medians) or (Path(source).expanduser() / MEDIANS_FILE).is_file()


def check_cells_readable(policy, cells: Iterable[tuple[str, dict]]) -> None:
    """Raise naming the first ``(where, cell)`` of which ``policy``'s cell encoder reads no gene (a cell it would see
    as empty); nothing to check for a model without a rank-value cell encoder."""
    encoder = getattr(policy, "encoders", {}).get("cell")
    encoder = getattr(encoder, "encoder", encoder)  # under its FeatureCache
    if not isinstance(encoder, CellEncoder):
        return
    for where, cell in cells:
        if cell is not None and not encoder.tokenizer.matched(cell):
            genes = [g for g, v in zip(cell["genes"], cell["values"]) if v > 0]
            raise ValueError(f"{where}: the model's cell encoder knows none of the cell's {len(genes)} expressed genes "
                             f"({', '.join(genes[:3])}...); name genes as its training data did (symbols or Ensembl ids)")


class CellEncoder(Encoder):
    """Hidden states of one layer of a BERT-family model (Geneformer, ``tiny-cell``) over a cell's rank-value
    gene tokens: one row per token. A ``BertForMaskedLM`` checkpoint (Geneformer's) loads whole and its
    ``BertModel`` is kept (the MLM head is dropped); a ``BertModel`` checkpoint loads as it is."""

    def __init__(self, source: str | Path, tokenizer: GeneTokenizer, layer: int = -1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                 revision: str | None = None, batch_size: int = 16, trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

        source = str(source)
        with loading_errors(source, "cell encoder", "tiny-cell", "set model.encoders.cell.trust_remote_code: true",
                            trust_remote_code):
            config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
            if any(a.endswith("ForMaskedLM") for a in config.architectures or []):  # Geneformer, tiny-cell
                model = AutoModelForMaskedLM.from_pretrained(source, config=config, revision=revision, dtype=dtype,
                                                             trust_remote_code=trust_remote_code)
                self.model = model.base_model  # the encoder; the MLM head is dropped
            else:
                pooler = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta") else {}
                self.model = AutoModel.from_pretrained(source, config=config, revision=revision, dtype=dtype,
                                                       trust_remote_code=trust_remote_code, **pooler)
        self.model.requires_grad_(False).eval().to(device)
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and tokenizer.max_length > positions:
            raise ValueError(f"cell encoder {source}: max_length {tokenizer.max_length} is over its "
                             f"{positions} positions; lower model.encoders.cell.max_length")
        if max(tokenizer.token_ids.values()) >= config.vocab_size:
            raise ValueError(f"cell encoder {source}: the gene-token dictionary has ids up to "
                             f"{max(tokenizer.token_ids.values())} but the model has {config.vocab_size} tokens; "
                             "give the dictionary the model was trained with")
        n_states = config.num_hidden_layers + 1
        if not -n_states <= layer < n_states:
            raise ValueError(f"cell encoder {source}: layer {layer} out of range; it has hidden states 0..{n_states - 1}")
        self.tokenizer, self.layer, self.batch_size = tokenizer, layer, batch_size
        self.modality, self.hidden_size = "cell", config.hidden_size
        version = getattr(config, "_commit_hash", None) or revision or _local_version(source)
        self.identity = hashlib.sha256(json.dumps(
            [source, version, layer % n_states, tokenizer.fingerprint(), str(dtype)]).encode()).hexdigest()[:20]

    def num_positions(self, item: dict) -> int:
        return len(self.tokenizer(item))

    @torch.no_grad()
    def to(self, device) -> "CellEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, items: list[dict]) -> list[torch.Tensor]:
        out = []
        for start in range(0, len(items), self.batch_size):
            rows = [self.tokenizer(item) for item in items[start : start + self.batch_size]]
            width = max(1, max(len(r) for r in rows))
            ids = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):  # right padding: real tokens keep their positions
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, : len(r)] = 1
            states = self.model(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                output_hidden_states=True).hidden_states[self.layer]
            out += [states[i, : len(r)].detach() for i, r in enumerate(rows)]
        return out
