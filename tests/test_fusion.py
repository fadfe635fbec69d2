"""Fused models: encoders, feature cache, projectors, placeholder expansion, training, saving and reloading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from biopost.config import ConfigError, EncoderConfig, LoraConfig, RLStage, validate_config
from biopost.data import Example
from biopost.data.splits import LeakageError
from biopost.evaluation import collate_payloads, encode_prompts
from biopost.models.adapters import prepare_for_training
from biopost.models.encoders import FeatureCache, TransformersEncoder, load_encoder
from biopost.models.fusion import FusionError, Projector, fuse
from biopost.models.policy import PROJECTOR_FILE, load_policy
from biopost.models.tiny_encoders import build_tiny_encoder, check_encoder_leakage, letter_ids
from biopost.registry import TASKS, register_task
from biopost.tasks.base import LabelTask
from conftest import Interrupt, digest_dir, interrupt_at

pytestmark = pytest.mark.usefixtures("one_thread")

MOTIFS = {"TATA box": "TATAAAAG", "CAAT box": "GGCCAATCT", "GC box": "GGGGCGGGG", "E box": "CACGTGAC"}
FLANKS = {"balanced": [0.25] * 4, "gc-rich": [0.1, 0.4, 0.4, 0.1], "at-rich": [0.4, 0.1, 0.1, 0.4]}


class MotifTask(LabelTask):
    """Test-only: which promoter element a reference window holds; a variant window comes along (two DNA
    items per example). OOD = AT-rich flanks."""

    name = "test/dna-motif"
    domain = "genomics"
    default_ood_field = "flank"
    default_ood_test_groups = ["at-rich"]
    labels = list(MOTIFS)

    def load(self):
        rng = np.random.default_rng(0)
        examples = []
        for i in range(96):
            label, flank = list(MOTIFS)[i % 4], list(FLANKS)[(i // 4) % 3]
            left, right = ("".join(rng.choice(list("ACGT"), 12, p=FLANKS[flank])) for _ in range(2))
            ref = left + MOTIFS[label] + right
            alt = ref[:3] + "ACGT"[("ACGT".index(ref[3]) + 1) % 4] + ref[4:]
            examples.append(Example(id=f"m{i}", fields={}, answer=label, dna=(ref, alt), meta={"flank": flank}))
        return examples

    def user_prompt(self, example):
        ref, alt = example.dna
        return (f"Reference: {self.sequence_text('dna', ref)}\nVariant: {self.sequence_text('dna', alt)}\n"
                f"Which promoter element is in the reference? Choose one of: {'; '.join(self.labels)}.")


if MotifTask.name not in TASKS:
    register_task(MotifTask)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny DNA encoder built by the real builder with a handful of steps (records its pretraining data)."""
    path = tmp_path_factory.mktemp("encoder") / "tiny-dna-test"
    build_tiny_encoder("tiny-dna", path, seed=0, steps=3)
    return path


@pytest.fixture(scope="module")
def motif():
    task = MotifTask()
    task.fused_modalities = frozenset({"dna"})
    return task, task.load()


def fused_policy(backbone, encoder_dir, **encoder):
    cfg = EncoderConfig(**{"name": str(encoder_dir), "cache": False, **encoder})
    return fuse(load_policy(backbone), {"dna": cfg}, seed=0)


# ---------------------------------------------------------------- encoders and the feature cache
def test_padded_batch_gives_each_sequences_features(encoder_dir):
    encoder = TransformersEncoder(encoder_dir, "dna", layer=2)
    seqs = ["ACGT", "ACGTACGTTTGACCA" * 3, "GGC"]
    batched = encoder.encode(seqs)
    for seq, features in zip(seqs, batched):
        alone = encoder.encode([seq])[0]
        assert features.shape == alone.shape == (len(seq) + 2, encoder.hidden_size)  # <cls> ... <eos>
        torch.testing.assert_close(features, alone, atol=1e-5, rtol=1e-5)
    assert encoder.num_positions(seqs[1]) == len(seqs[1]) + 2
    assert not torch.equal(batched[0], TransformersEncoder(encoder_dir, "dna", layer=1).encode(seqs[:1])[0])


def test_feature_cache_encodes_once_and_writes_atomically(encoder_dir, tmp_path):
    encoder = TransformersEncoder(encoder_dir, "dna", layer=-1)
    calls = []
    original = encoder.encode
    encoder.encode = lambda items: calls.append(list(items)) or original(items)
    cache = FeatureCache(encoder, tmp_path)
    first = cache.encode(["ACGTAC", "TTTT", "ACGTAC"])
    second = cache.encode(["TTTT", "ACGTAC"])
    assert calls == [["ACGTAC", "TTTT"]]  # each distinct sequence encoded once, then read from disk
    torch.testing.assert_close(second[1], first[0])
    torch.testing.assert_close(first[1], original(["TTTT"])[0])
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 2 and all(f.endswith(".safetensors") and not f.startswith(".") for f in files)
    other_layer = TransformersEncoder(encoder_dir, "dna", layer=1)
    assert other_layer.identity != encoder.identity  # features of another layer never share cache entries


def test_encoder_config_errors(encoder_dir):
    with pytest.raises(ConfigError, match="attention_pool needs num_tokens"):
        validate_config({"task": {"name": "x"}, "model": {"encoders": {"dna": {"name": "tiny-dna", "projector": "attention_pool"}}},
                         "stages": [{"kind": "sft"}]})
    with pytest.raises(ConfigError, match="model.encoders"):
        validate_config({"task": {"name": "x"}, "model": {"encoders": {"rna": {"name": "tiny-dna"}}}, "stages": [{"kind": "sft"}]})
    with pytest.raises(ValueError, match="layer 9 out of range"):
        TransformersEncoder(encoder_dir, "dna", layer=9)
    with pytest.raises(FileNotFoundError, match="no encoder at"):
        load_encoder(EncoderConfig(name=str(encoder_dir / "missing")), "dna")
    with pytest.raises(ValueError, match="reads dna, not protein"):
        load_encoder(EncoderConfig(name="tiny-dna"), "protein")


# ---------------------------------------------------------------- projectors
@pytest.mark.parametrize("kind,num_tokens", [("linear", None), ("mlp", None), ("mlp", 3), ("attention_pool", 2)])
def test_projector_positions_and_padding(kind, num_tokens):
    torch.manual_seed(0)
    projector = Projector(kind, 8, 16, num_tokens)
    features = [torch.randn(5, 8), torch.randn(2, 8), torch.randn(9, 8)]
    out = projector(features)
    assert [tuple(o.shape) for o in out] == [(num_tokens or len(f), 16) for f in features]
    for f, together in zip(features, out):  # a batch projects each item exactly as alone
        torch.testing.assert_close(projector([f])[0], together, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- placeholders
def test_placeholders_expand_to_projected_positions(tiny_backbone, encoder_dir, motif):
    task, examples = motif
    policy = fused_policy(tiny_backbone, encoder_dir, num_tokens=None, projector="linear")
    batch = examples[:3]
    prompts = [policy.render_prompt(task.messages(e)) for e in batch]
    payloads = collate_payloads(batch, policy.modalities)
    ids = policy.tokenize(prompts, payloads)
    dna = policy.placeholder_ids["dna"]
    for row, example in zip(ids, batch):  # each window: its length plus <cls> and <eos>
        assert row.count(dna) == sum(len(s) + 2 for s in example.dna)
    enc = encode_prompts(policy, prompts, payloads)
    embeds = policy.embed(enc["input_ids"], payloads)
    plain = policy.model.get_input_embeddings()(enc["input_ids"])
    spliced = enc["input_ids"] == dna
    assert not torch.equal(embeds[spliced], plain[spliced])
    torch.testing.assert_close(embeds[~spliced], plain[~spliced])  # left padding: everything else untouched


def test_placeholder_feature_mismatch_is_a_clear_error(tiny_backbone, encoder_dir, motif):
    task, examples = motif
    policy = fused_policy(tiny_backbone, encoder_dir, num_tokens=4)
    example = examples[0]
    one_item = {"dna": [example.dna[:1]]}
    prompt = policy.render_prompt(task.messages(example))  # two placeholders
    with pytest.raises(FusionError, match=r"2 <\|dna\|> placeholder\(s\) but its dna payload has 1 item"):
        policy.tokenize([prompt], one_item)
    text_task = MotifTask()  # sequences as text: no placeholder for the encoder's items
    with pytest.raises(FusionError, match="task.fused_modalities must include 'dna'"):
        policy.tokenize([policy.render_prompt(text_task.messages(example))], {"dna": [example.dna]})
    enc = encode_prompts(policy, [prompt], {"dna": [example.dna]})
    with pytest.raises(FusionError, match="8 <\\|dna\\|> positions but the projector gives 4"):
        policy.embed(enc["input_ids"], one_item)


def test_text_policy_tokenizes_as_the_tokenizer(tiny_backbone, pbmc_task, pbmc_splits):
    policy = load_policy(tiny_backbone)
    prompts = [policy.render_prompt(pbmc_task.messages(e)) for e in pbmc_splits.val[:3]]
    assert policy.tokenize(prompts) == policy.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    side = policy.tokenizer.padding_side
    policy.tokenizer.padding_side = "left"
    want = policy.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    policy.tokenizer.padding_side = side
    got = encode_prompts(policy, prompts)
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["attention_mask"], want["attention_mask"])


# ---------------------------------------------------------------- training, saving, reloading
def test_rl_update_trains_projector_and_adapter_not_encoder(tiny_backbone, encoder_dir, motif, tmp_path):
    from biopost.stages import rl

    task, examples = motif
    policy = fused_policy(tiny_backbone, encoder_dir, num_tokens=4, projector="attention_pool")
    encoder_before = {k: v.clone() for k, v in policy.encoders["dna"].model.state_dict().items()}
    policy = prepare_for_training(policy, LoraConfig(rank=4, alpha=8, dropout=0.0), tmp_path)
    stage = RLStage(num_generations=2, prompts_per_step=2, max_completion_length=6, lr=1e-2, beta=0.0)
    torch.manual_seed(0)
    batch = rl.rollout(policy, task, examples[:2], stage)
    projector_before = policy.projector_state()
    lora_before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params + policy.projector_parameters(), lr=1e-2)
    scheduler = rl.make_scheduler(stage, optimizer, 1)
    rl.optimise(policy, optimizer, scheduler, params, batch, torch.tensor([1.0, -1.0, 0.5, -0.5]), stage)
    assert all(not torch.equal(projector_before[k], v) for k, v in policy.projector_state().items())
    changed = [n for n, p in policy.model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert any("lora_B" in n for n in changed)
    encoder = policy.encoders["dna"].model
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(v, encoder_before[k]) for k, v in encoder.state_dict().items())


def test_freeze_projector(tiny_backbone, encoder_dir, tmp_path):
    policy = fused_policy(tiny_backbone, encoder_dir, num_tokens=2)
    assert policy.projector_parameters()
    frozen = prepare_for_training(policy, LoraConfig(rank=4, alpha=8), tmp_path, freeze_projector=True)
    assert frozen.projector_parameters() == [] and frozen.projector_state()  # kept and saved, not trained
    assert prepare_for_training(frozen, None, tmp_path).projector_parameters()


@pytest.mark.parametrize("lora", [True, False])
def test_saved_fused_checkpoint_reloads_and_predicts_the_same(tiny_backbone, encoder_dir, motif, tmp_path, lora):
    task, examples = motif
    policy = fused_policy(tiny_backbone, encoder_dir, num_tokens=3)
    policy.save(tmp_path / "base")
    policy = prepare_for_training(load_policy(tmp_path / "base"), LoraConfig(rank=4, alpha=8) if lora else None, tmp_path)
    with torch.no_grad():  # move the adapter and projector away from their initial values
        for p in [*policy.projector_parameters(), *(p for p in policy.model.parameters() if p.requires_grad)]:
            p.add_(0.05 * torch.randn_like(p))
    policy.save(tmp_path / "ckpt")
    info = json.loads((tmp_path / "ckpt" / "biopost_checkpoint.json").read_text())
    assert info["kind"] == ("adapter" if lora else "full") and info["fusion"]["projectors"]["dna"]["kind"] == "mlp"
    assert (tmp_path / "ckpt" / PROJECTOR_FILE).is_file()
    again = load_policy(tmp_path / "ckpt")
    batch = examples[:4]
    prompts = [policy.render_prompt(task.messages(e)) for e in batch]
    payloads = collate_payloads(batch, policy.modalities)
    enc = encode_prompts(policy, prompts, payloads)
    policy.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.logits(enc["input_ids"], enc["attention_mask"], payloads),
                                   policy.logits(enc["input_ids"], enc["attention_mask"], payloads))
    kwargs = dict(max_new_tokens=6, do_sample=False, temperature=None, top_p=None, top_k=None)
    assert torch.equal(again.generate(enc["input_ids"], enc["attention_mask"], payloads, **kwargs),
                       policy.generate(enc["input_ids"], enc["attention_mask"], payloads, **kwargs))


def test_fused_pipeline_cpt_sft_rl(tmp_path, encoder_dir, monkeypatch):
    """CPT (text only), SFT and RL through the pipeline: the projector and adapter train, the encoder's files
    stay the same, and ``biopost eval`` on the final checkpoint reproduces the run's own final predictions."""
    from biopost.evaluation import generate_completions
    from biopost.inference import evaluate_checkpoint, task_for_checkpoint
    from biopost.pipeline import run
    from biopost.runlog import read_metrics

    monkeypatch.setenv("BIOPOST_CACHE", str(tmp_path / "cache"))
    encoder_digest = digest_dir(encoder_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"The TATA box sits upstream of gene {i}."}) + "\n" for i in range(12)))
    config = validate_config({
        "name": "fused", "task": {"name": MotifTask.name},
        "model": {"backbone": "tiny-s", "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0},
                  "encoders": {"dna": {"name": str(encoder_dir), "num_tokens": 4, "batch_size": 8}}},
        "eval": {"splits": ["val", "ood_test"], "max_examples": 4, "batch_size": 4, "max_new_tokens": 8, "bootstrap": 0},
        "stages": [{"kind": "cpt", "max_steps": 2, "batch_size": 4, "seq_length": 32,
                    "corpus": {"source": "files", "paths": [str(corpus)], "take": 12, "heldout": 2}},
                   {"kind": "sft", "max_steps": 3, "eval_every_steps": 3, "batch_size": 4, "lr": 1e-2, "eval_at_start": False},
                   {"kind": "rl", "max_steps": 2, "eval_every_steps": 2, "prompts_per_step": 2, "num_generations": 2,
                    "max_completion_length": 8, "lr": 1e-2, "eval_at_start": False}],
    })
    run_dir = run(config, tmp_path / "run")
    stages = run_dir / "stages"
    projector = {name: load_file(path / PROJECTOR_FILE) for name, path in
                 {"base": run_dir / "backbone-fused", "cpt": stages / "0-cpt" / "final", "sft": stages / "1-sft" / "final"}.items()}
    assert all(torch.equal(projector["base"][k], projector["cpt"][k]) for k in projector["base"])  # no payloads
    assert any(not torch.equal(projector["cpt"][k], projector["sft"][k]) for k in projector["base"])
    sft_adapter = load_file(stages / "1-sft" / "final" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in sft_adapter.items())  # LoRA B starts at zero
    assert digest_dir(encoder_dir) == encoder_digest
    assert list((tmp_path / "cache" / "features").rglob("*.safetensors"))  # features were cached on disk
    rows = read_metrics(run_dir)
    assert {(r["stage"], r["split"]) for r in rows if r["metric"] == "accuracy"} >= {
        ("sft", "val"), ("sft", "ood_test"), ("rl", "val"), ("rl", "ood_test")}
    state = json.loads((stages / "2-rl" / "final" / "biopost_checkpoint.json").read_text())
    assert state["task"]["fused_modalities"] == ["dna"] and "dna" in state["fusion"]["encoders"]
    final = stages / "2-rl" / "final"
    task, _ = task_for_checkpoint(final, MotifTask.name)
    assert task.fused_modalities == {"dna"}
    saved = [json.loads(line) for line in (run_dir / "predictions" / "rl-step000002-val.jsonl").read_text().splitlines()]
    examples = {e.id: e for e in task.load()}
    again, _ = generate_completions(load_policy(final), task, [examples[r["id"]] for r in saved], config.eval)
    assert again == [r["completions"] for r in saved]
    logged = {r["value"] for r in rows if (r["stage"], r["step"], r["split"], r["metric"]) == ("rl", 2, "val", "accuracy")}
    evaluated = [r["value"] for r in evaluate_checkpoint(final, MotifTask.name, ["val"], 4) if r["metric"] == "accuracy"]
    assert evaluated == list(logged)


def test_interrupted_fused_sft_resumes_its_projector(tmp_path, encoder_dir, monkeypatch):
    """The Trainer's resumable checkpoints carry the projector: a resumed run ends with the same weights."""
    from biopost.pipeline import run

    monkeypatch.setenv("BIOPOST_CACHE", str(tmp_path / "cache"))
    config = validate_config({
        "task": {"name": MotifTask.name},
        "model": {"backbone": "tiny-s", "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0},
                  "encoders": {"dna": {"name": str(encoder_dir), "num_tokens": 2}}},
        "eval": {"splits": ["val"], "max_examples": 2, "batch_size": 2, "max_new_tokens": 2, "bootstrap": 0},
        "stages": [{"kind": "sft", "max_steps": 4, "eval_every_steps": 2, "batch_size": 4, "lr": 1e-2,
                    "eval_at_start": False}],
    })
    whole = run(config, tmp_path / "whole")
    resume = interrupt_at(monkeypatch, 4)
    with pytest.raises(Interrupt):
        run(config, tmp_path / "cut")
    assert (tmp_path / "cut" / "stages" / "0-sft" / "trainer" / "checkpoint-2" / PROJECTOR_FILE).is_file()
    resume()
    resumed = run(config, tmp_path / "cut")
    for file in (PROJECTOR_FILE, "adapter_model.safetensors"):
        a, b = (load_file(d / "stages" / "0-sft" / "final" / file) for d in (whole, resumed))
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def load_file(path):
    from safetensors.torch import load_file as load

    return load(path)


# ---------------------------------------------------------------- pretraining and leakage
def test_tiny_encoder_pretraining_lowers_heldout_loss(tmp_path):
    report = build_tiny_encoder("tiny-protein", tmp_path / "enc", seed=0, steps=40)
    saved = json.loads((tmp_path / "enc" / "pretraining.json").read_text())
    assert saved == report
    assert report["heldout_mlm_loss"] < report["untrained_heldout_mlm_loss"] - 0.2
    seqs = json.loads((tmp_path / "enc" / "sequences.json").read_text())
    assert not set(seqs["train"]) & set(seqs["heldout"])
    encoder = TransformersEncoder(tmp_path / "enc", "protein")
    assert encoder.encode(["MKVLAAGIV"])[0].shape == (11, 64)
    for seq in seqs["train"][:20]:  # the builder's fast tokenization is the tokenizer's
        assert letter_ids(encoder.tokenizer, seq) == encoder.tokenizer(seq)["input_ids"]


class HeldOut:
    """Splits whose only held-out examples are in ood_test, with the given DNA payloads."""

    def __init__(self, *payloads):
        self.examples = tuple(Example(f"t{i}", {}, "x", dna=p) for i, p in enumerate(payloads))

    def __getitem__(self, name):
        return self.examples if name == "ood_test" else ()


def test_leakage_check_finds_pretraining_sequences_in_held_out_payloads(encoder_dir):
    window = json.loads((encoder_dir / "sequences.json").read_text())["train"][5]
    reverse = window.translate(str.maketrans("ACGT", "TGCA"))[::-1]
    check_encoder_leakage(str(encoder_dir), "dna", HeldOut("ACGT" * 10, ("TTGACA", window[:20])))
    for leaked in ["CC" + window[10:40] + "GG", ("ACGT", reverse[:30]), window]:
        with pytest.raises(LeakageError, match="pretraining data of"):
            check_encoder_leakage(str(encoder_dir), "dna", HeldOut(leaked))


# ---------------------------------------------------------------- added tokens, padded vocabularies, moved runs
def test_placeholders_take_free_rows_of_a_padded_vocabulary(tiny_backbone, encoder_dir, tmp_path):
    """Like Qwen2.5 (config.vocab_size > len(tokenizer)): a placeholder takes a free row; nothing shrinks."""
    from transformers import AutoConfig, AutoTokenizer, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    config = AutoConfig.from_pretrained(tiny_backbone)
    config.vocab_size = len(tokenizer) + 5
    Qwen3ForCausalLM(config).save_pretrained(tmp_path / "padded")
    tokenizer.save_pretrained(tmp_path / "padded")
    before = load_policy(tmp_path / "padded").model.get_input_embeddings().weight.detach().clone()
    policy = fused_policy(tmp_path / "padded", encoder_dir, num_tokens=2)
    after = policy.model.get_input_embeddings().weight
    assert after.shape == before.shape and policy.placeholder_ids["dna"] == len(tokenizer)
    assert torch.equal(after[: len(tokenizer)], before[: len(tokenizer)])


def test_moved_fused_run_with_added_think_tokens(tmp_path, encoder_dir, motif, monkeypatch):
    """A fused run on a backbone without <think> tokens: LoRA stages train the added rows through the splice,
    and after `mv` every checkpoint (adapters on the fused backbone and on the merged SFT model) evaluates."""
    from biopost.inference import evaluate_checkpoint
    from biopost.models.policy import CHECKPOINT_FILE
    from biopost.models.tiny import THINK, build_tiny_backbone
    from biopost.pipeline import run

    monkeypatch.setenv("BIOPOST_CACHE", str(tmp_path / "cache"))
    task, examples = motif
    plain = build_tiny_backbone("tiny-s", task.training_texts(examples), tmp_path / "plain", think_tokens=False)
    lora = {"rank": 2, "alpha": 4.0, "dropout": 0.0}
    config = validate_config({
        "task": {"name": MotifTask.name},
        "model": {"backbone": str(plain), "think_tokens": "add", "lora": lora,
                  "encoders": {"dna": {"name": str(encoder_dir), "num_tokens": 2}}},
        "eval": {"splits": ["val"], "max_examples": 2, "batch_size": 2, "max_new_tokens": 4, "bootstrap": 0},
        "stages": [{"kind": "sft", "max_steps": 2, "eval_every_steps": 2, "batch_size": 4, "lr": 5e-2,
                    "eval_at_start": False},
                   {"kind": "rl", "init": "sft:best", "adapter": "new", "lora": lora, "max_steps": 2,
                    "eval_every_steps": 2, "prompts_per_step": 2, "num_generations": 2, "max_completion_length": 6,
                    "eval_at_start": False}],
    })
    run(config, tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # nothing may depend on the working directory either
    run_dir = tmp_path / "b"
    recorded = [p.read_text() for p in run_dir.rglob(CHECKPOINT_FILE)]
    old = str(tmp_path / "a")
    assert recorded and not any(f"{old}/" in text or f'{old}"' in text for text in recorded)  # nothing in the run
    assert any(f'"{plain}"' in text for text in recorded)  # the backbone outside it stays absolute
    checkpoints = [*run_dir.glob("stages/*/final"), *run_dir.glob("stages/*/checkpoints/*")]
    assert len(checkpoints) == 4
    for checkpoint in checkpoints:
        assert [r["metric"] for r in evaluate_checkpoint(checkpoint, MotifTask.name, ["val"], 2)], checkpoint

    sft = load_policy(run_dir / "stages" / "0-sft" / "final")
    base = load_policy(run_dir / "backbone-fused")
    assert type(sft).__name__ == "FusedPolicy" and sft.info["added_tokens"] == THINK
    ids = torch.tensor(sft.tokenizer.convert_tokens_to_ids(THINK))
    rows, base_rows = sft.embed(ids[None])[0], base.embed(ids[None])[0]
    assert not torch.allclose(rows, base_rows)  # SFT moved them (through the adapter's trainable rows)
    assert float((rows[0] - rows[1]).norm()) > 0.1 * float(base_rows.norm(dim=1).mean())  # and they differ
