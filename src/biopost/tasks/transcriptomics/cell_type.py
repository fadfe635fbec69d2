"""Cell-type annotation from cell sentences.

A cell becomes a *cell sentence*: its gene names in descending order of (log-normalised) expression,
zero genes dropped, ties broken by a shuffle seeded per cell, the top ``top_k_genes`` kept in the prompt.
The model answers with one cell type out of the labels seen in the data.

Two registered tasks share this code:

``cell_type/pbmc68k`` (embedded, offline): 700 human PBMCs with 10 FACS-sorted cell types from Zheng et
al. 2017, subsampled by scanpy (``scanpy.datasets.pbmc68k_reduced``, shipped inside the scanpy package).
OOD = cells that are *cycling*: scanpy's cell-cycle scoring labels each cell G1, S or G2M from the S-
and G2/M-phase gene programs. Training and in-domain tests use G1 cells only; ``ood_test`` holds the S and
G2M cells. Cycling cells express a proliferation programme (histones, replication and mitosis genes) that
pushes other genes down the ranking, so the same cell types appear with shifted cell sentences: a real
covariate shift over the same label set, not a relabelling. Default split (seed 0): train 351, val 50,
id_test 100, ood_test 199. Classical baseline (``biopost baseline`` on full splits; logistic regression on
log-normalised expression of the training cells' genes, C = 10 chosen on val): id_test accuracy 0.840
(95% CI 0.770-0.910), ood_test 0.688 (0.628-0.754).

``cell_type/h5ad``: any AnnData file, with the label column and the OOD group column chosen by the user
(tissue, donor, disease, batch...). Raw counts are library-size normalised and log1p transformed first.

Rationale in SFT targets (``<think>`` block): marker genes of each cell type are computed from the
*training split only* (scanpy ``rank_genes_groups``, t-test, top ``markers_per_type``). A cell's rationale
names its top genes that are markers of its annotated type and states which type they mark; when none of
its top genes is a marker, it says so and names the type the profile was annotated as.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field, StrictBool

from biopost.data import Example
from biopost.data.splits import subset
from biopost.registry import register_task
from biopost.tasks.base import LabelTask, TaskOptions


class CellTypeOptions(TaskOptions):
    top_k_genes: int = Field(32, ge=1, description="genes kept in the prompt's cell sentence")
    list_choices: StrictBool = Field(True, description="list the candidate cell types in the prompt")
    markers_per_type: int = Field(8, ge=1, description="train-split markers per type used in rationales")
    rationale: StrictBool = Field(True, description="write a marker-gene rationale into SFT targets")
    seed: int = Field(0, description="seed of the per-cell tie-break shuffle")
    max_cells: int | None = Field(None, ge=1, description="seeded subsample of cells after loading")


class H5adOptions(CellTypeOptions):
    path: Path = Field(..., description="an AnnData .h5ad file")
    label_key: str = Field(..., description="obs column holding the cell type")
    group_key: str = Field(..., description="obs column whose groups define OOD (tissue, donor, disease...)")
    organism: str = "Homo sapiens"
    use_raw: StrictBool = Field(False, description="read expression from .raw instead of .X")
    layer: str | None = Field(None, description="read expression from this layer instead of .X")
    gene_symbol_key: str | None = Field(None, description="var column with gene symbols; default var_names")


class CellTypeTask(LabelTask):
    domain = "transcriptomics"
    version = "1"
    system_prompt = (
        "You are an expert in single-cell transcriptomics. Think step by step inside <think> </think>, "
        "then reply with one line 'Answer: <cell type>'."
    )
    user_template = (
        "Organism: {{ organism }}. The {{ genes | length }} most highly expressed genes of one cell, in decreasing "
        "order: {{ cell }}.\nWhich cell type is this cell?"
        "{% if choices %} Choose one of: {{ choices | join('; ') }}.{% endif %}"
    )
    organism: str = "Homo sapiens"
    overlap_remedy = "raise task.options.top_k_genes (longer cell sentences tell cells apart), deduplicate the cells"

    def __init__(self, options=None):
        super().__init__(options)
        self.markers: dict[str, list[str]] = {}
        self.labels: list[str] = []

    # ---- data
    def read_adata(self):
        raise NotImplementedError

    def load(self) -> list[Example]:
        adata, label_key, group_key = self.read_adata()
        matrix = _expression(adata)
        genes = np.asarray(adata.var_names).astype(str)
        labels = adata.obs[label_key].astype(str).to_numpy()
        groups = adata.obs[group_key].astype(str).to_numpy()
        rows = subset(range(adata.n_obs), self.options.max_cells, self.options.seed)
        self.labels = sorted(set(labels[rows]))
        examples = []
        for i in rows:
            order_genes, order_values = cell_sentence(matrix, i, genes, seed=self.options.seed)
            examples.append(
                Example(
                    id=str(adata.obs_names[i]),
                    fields={"organism": self.organism, "genes": order_genes[: self.options.top_k_genes]},
                    answer=labels[i],
                    cell={"genes": order_genes, "values": order_values},
                    meta={"label": labels[i], group_key: groups[i]},
                )
            )
        return examples

    # ---- rationale statistics, from training cells only
    def fit(self, train) -> None:
        if not self.options.rationale:
            return
        import anndata
        import scanpy as sc
        import scipy.sparse as sp

        vocab = sorted({g for e in train for g in e.cell["genes"]})
        col = {g: j for j, g in enumerate(vocab)}
        r, c, v = [], [], []
        for i, e in enumerate(train):
            r += [i] * len(e.cell["genes"])
            c += [col[g] for g in e.cell["genes"]]
            v += list(e.cell["values"])
        adata = anndata.AnnData(sp.csr_matrix((v, (r, c)), shape=(len(train), len(vocab)), dtype=np.float32))
        adata.var_names = vocab
        adata.obs["label"] = [e.answer for e in train]
        keep = adata.obs["label"].value_counts()
        adata = adata[adata.obs["label"].isin(keep[keep >= 2].index)].copy()
        sc.tl.rank_genes_groups(adata, "label", method="t-test", n_genes=self.options.markers_per_type)
        names = adata.uns["rank_genes_groups"]["names"]
        self.markers = {label: [str(g) for g in names[label]] for label in names.dtype.names}

    def reasoning(self, example: Example) -> str:
        if not self.options.rationale:
            return example.reasoning
        if not self.markers:
            raise RuntimeError("call task.fit(train) before building rationale targets")
        top = example.fields["genes"]
        found = [g for g in top if g in set(self.markers.get(example.answer, []))]
        if not found:
            return f"None of the top genes is a marker I know; the profile fits {example.answer}."
        return f"Marker genes among the top genes: {', '.join(found[:4])}. They mark {example.answer}."

    def example_from_input(self, record: dict, where: str) -> Example:
        """A user's cell: ``{"id": ..., "genes": [ordered symbols]}`` or ``{"id": ..., "expression": {gene: value}}``
        (a model reading cells through an encoder needs the values: ``expression``)."""
        cell = None
        if "expression" in record:
            values = record["expression"]
            if not isinstance(values, dict) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
                raise ValueError(f"{where}: 'expression' must map gene symbols to numbers, e.g. {{\"LYZ\": 4.1}}")
            expr = {str(g): float(v) for g, v in values.items() if v > 0}
            ordered = sorted(expr, key=lambda g: -expr[g])
            cell = {"genes": ordered, "values": [expr[g] for g in ordered]}
        if "cell" in self.fused_modalities and cell is None:
            raise ValueError(f"{where}: this model reads cells through an encoder, which needs expression values: "
                             "give 'expression' ({gene: value})")
        if "genes" in record:
            if not isinstance(record["genes"], list) or not all(isinstance(g, str) and g for g in record["genes"]):
                raise ValueError(f"{where}: 'genes' must be a list of gene symbols ordered by expression, "
                                 'e.g. ["LYZ", "S100A9"]')
            genes = list(record["genes"])
        elif cell is not None:
            genes = cell["genes"]
        else:
            raise ValueError(f"{where}: a cell needs 'genes' (ordered by expression) or 'expression' ({{gene: value}})")
        if not genes:
            raise ValueError(f"{where}: the cell lists no expressed genes")
        return Example(
            id=str(record.get("id", where)),
            fields={"organism": record.get("organism", self.organism), "genes": genes[: self.options.top_k_genes]},
            answer=str(record.get("cell_type", "")), cell=cell,
        )

    def leak_keys(self, example: Example) -> list[str]:
        return [" ".join(example.fields["genes"])]

    # ---- prompt
    def prompt_variables(self, example: Example) -> dict:
        """``organism``, ``genes`` (a list), ``cell`` (the genes as text, or the placeholder when fused) and
        ``choices`` (the cell types, empty when ``list_choices`` is off)."""
        return {**example.fields, "cell": self.sequence_text("cell", " ".join(example.fields["genes"])),
                "choices": self.labels if self.options.list_choices else []}


def cell_sentence(matrix, row: int, genes: np.ndarray, seed: int = 0) -> tuple[list[str], list[float]]:
    """Genes of one cell by descending expression, zeros dropped, ties broken by a shuffle seeded per cell.

    >>> import scipy.sparse as sp
    >>> m = sp.csr_matrix(np.array([[0.0, 2.0, 1.0, 2.0]]))
    >>> names, values = cell_sentence(m, 0, np.array(["A", "B", "C", "D"]))
    >>> sorted(names[:2]), names[2], values
    (['B', 'D'], 'C', [2.0, 2.0, 1.0])
    """
    line = matrix[row]
    if hasattr(line, "indices"):
        idx, val = line.indices, line.data
    else:
        line = np.asarray(line).ravel()
        idx = np.nonzero(line)[0]
        val = line[idx]
    keep = val > 0
    idx, val = idx[keep], val[keep]
    tie = np.random.default_rng([seed, row]).random(len(idx))
    order = np.lexsort((tie, -val))
    return genes[idx[order]].tolist(), [round(float(x), 4) for x in val[order]]


def _expression(adata):
    import scipy.sparse as sp

    matrix = adata.X
    return matrix.tocsr() if sp.issparse(matrix) else np.asarray(matrix)


@register_task
class PBMC68kCellType(CellTypeTask):
    name = "cell_type/pbmc68k"
    Options = CellTypeOptions
    default_ood_field = "phase"
    default_ood_test_groups = ["G2M", "S"]

    def read_adata(self):
        import scanpy as sc

        adata = sc.datasets.pbmc68k_reduced()
        full = adata.raw.to_adata()  # log-normalised expression of all 765 genes
        full.obs = adata.obs.copy()
        return full, "bulk_labels", "phase"


@register_task
class H5adCellType(CellTypeTask):
    name = "cell_type/h5ad"
    Options = H5adOptions
    default_ood_field = ""  # the user's group_key, set in __init__
    default_ood_test_groups = 0.25

    def __init__(self, options=None):
        super().__init__(options)
        self.default_ood_field = self.options.group_key
        self.organism = self.options.organism

    def read_adata(self):
        import anndata
        import scanpy as sc

        opts = self.options
        if not opts.path.is_file():
            raise FileNotFoundError(f"h5ad file not found: {opts.path}; set task.options.path to an AnnData file")
        try:
            adata = anndata.read_h5ad(opts.path)
        except OSError as err:  # truncated, damaged, or not HDF5 at all (h5py says only "unable to open")
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{opts.path}: not a readable AnnData .h5ad file ({reason}); copy it again or write it "
                             "with adata.write_h5ad, and point task.options.path at it") from None
        for option, key in (("label_key", opts.label_key), ("group_key", opts.group_key)):
            if key not in adata.obs:
                raise ValueError(f"{opts.path.name}: no obs column {key!r} (task.options.{option}); "
                                 f"columns: {list(adata.obs.columns)}")
            empty = adata.obs[key].isna().to_numpy() | (adata.obs[key].astype(str).str.strip() == "").to_numpy()
            if empty.any():
                raise ValueError(f"{opts.path.name}: cell {str(adata.obs_names[empty.argmax()])!r} and {empty.sum() - 1} "
                                 f"more have no value in obs column {key!r} (task.options.{option}); fill them or "
                                 f"drop those cells (e.g. adata[adata.obs[{key!r}].notna()])")
        if opts.use_raw:
            if adata.raw is None:
                raise ValueError(f"{opts.path.name} has no .raw; set task.options.use_raw: false")
            obs = adata.obs.copy()
            adata = adata.raw.to_adata()
            adata.obs = obs
        elif opts.layer:
            adata = adata.copy()
            adata.X = adata.layers[opts.layer]
        if opts.gene_symbol_key:
            adata.var_names = adata.var[opts.gene_symbol_key].astype(str).to_numpy()
            adata.var_names_make_unique()
        if _looks_like_counts(adata.X):
            adata = adata.copy()
            sc.pp.normalize_total(adata, target_sum=1e4)
            sc.pp.log1p(adata)
        return adata, opts.label_key, opts.group_key


def _looks_like_counts(matrix) -> bool:
    """Raw counts are non-negative integers; normalised data is not."""
    data = matrix.data if hasattr(matrix, "data") and not isinstance(matrix, np.ndarray) else np.asarray(matrix).ravel()
    sample = np.asarray(data[:10000], dtype=np.float64)
    return sample.size > 0 and bool(np.all(sample >= 0) and np.all(np.mod(sample, 1) == 0) and sample.max() > 1)
