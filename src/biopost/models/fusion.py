"""The fused model: a language model reading frozen encoder features through trained projectors.

Each payload item (a sequence, or a cell) sits in the prompt as one placeholder token (``<|dna|>``,
``<|protein|>``, ``<|cell|>``; see ``Task.sequence_text``). :meth:`FusedPolicy.tokenize` expands each
placeholder to as many positions as the projector emits for that item, and :meth:`FusedPolicy.embed`
overwrites those positions' input embeddings with the projected features. ``logits`` and ``generate`` both
go through ``embed``, so CPT, SFT, RL, the evaluator and ``predict`` run a fused model unchanged.

What trains: LoRA (or full weights) on the language model as for any policy, plus the projectors in every
stage (``freeze_projector: true`` keeps them fixed). The encoders never train. A checkpoint is the usual
directory plus ``projector.safetensors``; ``biopost_checkpoint.json`` records the encoders and projector
kinds under ``fusion``, so ``load_policy`` rebuilds the same model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from biopost.data.example import PLACEHOLDERS
from biopost.models.backbones import grow_embeddings
from biopost.models.encoders import Encoder, load_encoder
from biopost.models.policy import CHECKPOINT_FILE, PROJECTOR_FILE, Policy, load_policy


class FusionError(ValueError):
    """Prompt placeholders and encoder features do not line up."""


class Projector(nn.Module):
    """Encoder features ``[n, in_dim]`` -> prompt positions ``[m, out_dim]``.

    ``linear`` / ``mlp`` (two layers, GELU): one position per encoder position, or ``num_tokens`` positions
    by averaging contiguous runs of encoder positions first. ``attention_pool``: ``num_tokens`` learned
    queries attend over all encoder positions (a padding mask keeps batches exact).
    """

    def __init__(self, kind: str, in_dim: int, out_dim: int, num_tokens: int | None = None):
        super().__init__()
        self.kind, self.in_dim, self.out_dim, self.num_tokens = kind, in_dim, out_dim, num_tokens
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        elif kind == "attention_pool":
            if num_tokens is None:
                raise ValueError("attention_pool needs num_tokens")
            heads = next(h for h in (8, 4, 2, 1) if out_dim % h == 0)
            self.net = nn.Linear(in_dim, out_dim)
            self.queries = nn.Parameter(torch.randn(num_tokens, out_dim) / math.sqrt(out_dim))
            self.attention = nn.MultiheadAttention(out_dim, heads, batch_first=True)
        else:
            raise ValueError(f"unknown projector {kind!r}; choose linear, mlp or attention_pool")

    def spec(self) -> dict:
        return {"kind": self.kind, "in_dim": self.in_dim, "out_dim": self.out_dim, "num_tokens": self.num_tokens}

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if not features:
            return []
        if self.kind == "attention_pool":
            return list(self._attend(features))
        if self.num_tokens:
            features = [nn.functional.adaptive_avg_pool1d(f.T[None], self.num_tokens)[0].T for f in features]
        out = self.net(torch.cat(features))
        return list(out.split([len(f) for f in features]))

    def _attend(self, features: list[torch.Tensor]) -> torch.Tensor:
        keys = nn.utils.rnn.pad_sequence([self.net(f) for f in features], batch_first=True)
        lengths = torch.tensor([len(f) for f in features], device=keys.device)
        padding = torch.arange(keys.shape[1], device=keys.device)[None] >= lengths[:, None]
        queries = self.queries[None].expand(len(features), -1, -1)
        return self.attention(queries, keys, keys, key_padding_mask=padding, need_weights=False)[0]


@dataclass
class FusedPolicy(Policy):
    """A :class:`Policy` whose placeholder positions carry projected encoder features."""

    encoders: dict[str, Encoder] = field(default_factory=dict)
    projectors: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    placeholder_ids: dict[str, int] = field(default_factory=dict)

    # ---- tokenization: one placeholder per item -> one position per projected feature
    def tokenize(self, texts: list[str], payloads: dict[str, list] | None = None) -> list[list[int]]:
        rows = super().tokenize(texts)
        payloads = payloads or {}
        by_id = {i: m for m, i in self.placeholder_ids.items()}
        out = []
        for row, ids in enumerate(rows):
            counts = {m: [self.projectors[m].num_tokens or self.encoders[m].num_positions(item)
                          for item in self.encoders[m].items(payloads[m][row] if m in payloads else None)]
                      for m in self.encoders}
            found = {m: sum(1 for t in ids if t == i) for m, i in self.placeholder_ids.items()}
            for m in self.encoders:
                if found[m] != len(counts[m]):
                    raise FusionError(
                        f"prompt {row} has {found[m]} {PLACEHOLDERS[m]} placeholder(s) but its {m} payload has "
                        f"{len(counts[m])} item(s); the task must show each {m} item with "
                        f"task.sequence_text (task.fused_modalities must include {m!r})")
            expanded = []
            for t in ids:
                expanded += [t] * counts[by_id[t]].pop(0) if t in by_id else [t]
            out.append(expanded)
        return out

    # ---- the splice
    def embed(self, input_ids: torch.Tensor, payloads: dict | None = None) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(input_ids)
        rows, cols, values = [], [], []
        for modality, per_row in (payloads or {}).items():
            encoder, projector = self.encoders[modality], self.projectors[modality]
            if next(projector.parameters()).device != embeds.device:  # the LM was moved (e.g. by the Trainer)
                projector.to(embeds.device)
            items = [encoder.items(p) for p in per_row]
            keys = [encoder.item_key(it) for row in items for it in row]
            unique = dict(zip(keys, (it for row in items for it in row)))  # RL repeats each prompt G times
            by_key = dict(zip(unique, encoder.encode(list(unique.values()))))
            features = [by_key[k] for k in keys]
            param = next(projector.parameters())
            projected = projector([f.to(param.device, param.dtype) for f in features])
            start = 0
            for r, row_items in enumerate(items):
                vectors = projected[start : start + len(row_items)]
                start += len(row_items)
                positions = (input_ids[r] == self.placeholder_ids[modality]).nonzero().squeeze(1)
                n = sum(len(v) for v in vectors)
                if len(positions) != n:
                    raise FusionError(
                        f"row {r}: {len(positions)} {PLACEHOLDERS[modality]} positions but the projector gives {n} "
                        f"for {len(row_items)} {modality} item(s); tokenize prompts with Policy.tokenize")
                if n:
                    rows.append(torch.full_like(positions, r))
                    cols.append(positions)
                    values.append(torch.cat(vectors))
        if not values:
            return embeds
        return embeds.index_put((torch.cat(rows), torch.cat(cols)), torch.cat(values).to(embeds.dtype))

    def to(self, device) -> "FusedPolicy":
        """The LM, the projectors and the frozen encoders, all on ``device``."""
        super().to(device)
        self.projectors.to(device)
        for encoder in self.encoders.values():
            encoder.to(device)
        return self

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, payloads=None, **kwargs) -> torch.Tensor:
        """As :meth:`Policy.generate`; placeholders are never sampled (they would have no features)."""
        suppress = sorted(set(kwargs.pop("suppress_tokens", None) or []) | set(self.placeholder_ids.values()))
        return super().generate(input_ids, attention_mask, payloads, suppress_tokens=suppress, **kwargs)

    # ---- the projectors: trained beside the LM, saved with every checkpoint
    def projector_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.projectors.parameters() if p.requires_grad]

    def projector_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.projectors.state_dict().items()}

    def load_projector_state(self, state: dict[str, torch.Tensor]) -> None:
        self.projectors.load_state_dict(state)

    def set_projector_trainable(self, trainable: bool) -> None:
        self.projectors.requires_grad_(trainable)


def fusion_spec(encoder_configs: dict, projectors: nn.ModuleDict) -> dict:
    """What ``biopost_checkpoint.json`` records so the same fused model can be rebuilt."""
    return {"encoders": {m: dict(cfg) for m, cfg in encoder_configs.items()},
            "projectors": {m: p.spec() for m, p in projectors.items()},
            "placeholders": {m: PLACEHOLDERS[m] for m in encoder_configs}}


def fuse(policy: Policy, encoders: dict, seed: int = 0) -> FusedPolicy:
    """A fused policy with new projectors (seeded, without touching the global RNG) for ``encoders`` configs."""
    loaded = load_encoders(policy, encoders)
    width = policy.model.get_input_embeddings().embedding_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projectors = nn.ModuleDict({m: Projector(cfg.projector, loaded[m].hidden_size, width, cfg.num_tokens)
                                    for m, cfg in encoders.items()})
    spec = fusion_spec({m: cfg.model_dump(mode="json") for m, cfg in encoders.items()}, projectors)
    return _fused(policy, loaded, projectors, spec)


def load_encoders(policy: Policy, configs: dict) -> dict:
    """The frozen encoders of ``configs`` (modality -> EncoderConfig), on the policy's device and dtype."""
    return {m: load_encoder(cfg, m, policy.device, policy.model.dtype) for m, cfg in configs.items()}


def _fused(policy: Policy, encoders: dict, projectors: nn.ModuleDict, spec: dict) -> FusedPolicy:
    ids = add_placeholder_tokens(policy, [PLACEHOLDERS[m] for m in encoders])
    projectors.to(device=policy.device, dtype=policy.model.dtype)
    info = {**policy.info, "fusion": spec}
    common = {f.name: getattr(policy, f.name) for f in dataclasses.fields(Policy)}
    return FusedPolicy(**{**common, "info": info, "modalities": tuple(sorted(encoders))}, encoders=encoders,
                       projectors=projectors, placeholder_ids={m: ids[PLACEHOLDERS[m]] for m in encoders})


def add_placeholder_tokens(policy: Policy, tokens: list[str]) -> dict[str, int]:
    """Placeholders as single special tokens (embedding rows added where missing; their values are unused)."""
    from transformers import AddedToken

    missing = [t for t in tokens if t not in policy.tokenizer.get_vocab()]
    if missing:
        policy.tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        grow_embeddings(policy.model, len(policy.tokenizer))
    return {t: policy.tokenizer.convert_tokens_to_ids(t) for t in tokens}


def attach_saved_fusion(policy: Policy, path: Path, info: dict) -> Policy:
    """``policy`` as the fused model a checkpoint records (its projector weights from ``path``); unchanged if none."""
    spec = info.get("fusion")
    if not spec:
        return policy
    if not isinstance(policy, FusedPolicy):  # an adapter's base is fused already; a full checkpoint is not yet
        from biopost.config import EncoderConfig

        encoders = load_encoders(policy, {m: EncoderConfig(**cfg) for m, cfg in spec["encoders"].items()})
        projectors = nn.ModuleDict({m: Projector(**p) for m, p in spec["projectors"].items()})
        policy = _fused(policy, encoders, projectors, spec)
    policy.load_projector(path)
    return policy


def build_fused_base(base: str, run_dir: Path, model, seed: int) -> str:
    """The backbone with placeholder tokens and new projectors (``model``: the run's model config), saved once in the
    run directory."""
    target = Path(run_dir) / "backbone-fused"
    if (target / CHECKPOINT_FILE).is_file():
        return str(target)
    from biopost.models.device import resolve_device, resolve_dtype

    dtype = resolve_dtype(model.dtype, resolve_device(model.device))
    policy = load_policy(base, dtype, revision=model.revision, trust_remote_code=model.trust_remote_code)
    fuse(policy, model.encoders, seed).save(target)
    return str(target)

