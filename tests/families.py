"""The conformance matrix's table of cases: tiny random models of real transformers families, saved
in the layouts the Hub holds.

A `Family` names the real transformers classes of one architecture (config, bare base model, the
task model the Hub holds, the sequence-classification class if there is one) and, as a spec
written by hand, which checkpoint tensors the ``vo`` preset must target. A `Case` is a family in
one layout and one storage:

* layout ``task``: the model class the Hub holds for the family, tensors under its
  ``base_model_prefix`` plus its head: ``model.layers...`` + ``lm_head`` for decoders,
  ``bert.encoder...`` + ``cls...`` (BertForPreTraining, as bert-base-uncased) or ``*ForMaskedLM``
  for encoders;
* layout ``bare``: the base model alone (`AutoModel`), as sentence-transformers saves a
  ``BertModel`` (``encoder.layer...``, no prefix) or an embedding model saves a ``Qwen2Model``;
* storage: ``bf16-sharded`` (``save_pretrained(max_shard_size=...)``: several shards and an
  index), ``fp32`` or ``fp16`` (one ``model.safetensors``).

Every model is hidden 64, 2 layers, vocabulary 128 (the word-level tokenizer of
`spra_tools.demo.build_word_tokenizer` is saved with it, so `train` runs), 4 experts for MoE, and
every parameter gets seeded noise on top of transformers' init, so no norm weight is exactly 1
and no bias exactly 0 (a bias or norm that is silently dropped shows in the logits).

Mixture-of-experts in transformers 5.24: the model holds each layer's experts as two fused 3-D
parameters of a plain `nn.Module` (``MixtralExperts`` / ``Qwen3MoeExperts``):
``mlp.experts.gate_up_proj`` [experts, 2 x intermediate, hidden] (gate rows, then up rows) and
``mlp.experts.down_proj`` [experts, hidden, intermediate]; the router ``mlp.gate.weight`` is a
bare parameter of ``MixtralTopKRouter`` / ``Qwen3MoeTopKRouter``, not an `nn.Linear`. Checkpoints
keep the per-expert 2-D layout: `save_pretrained` reverses the conversion
(`transformers.core_model_loading.revert_weight_conversion`) and writes
``model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight`` (Mixtral; ``block_sparse_moe`` is
renamed to ``mlp`` on load) or ``model.layers.N.mlp.experts.E.gate_proj/up_proj/down_proj.weight``
(Qwen3-MoE); `from_pretrained` fuses them back (`conversion_mapping._build_checkpoint_conversion_mapping`,
entries "mixtral" and "qwen2_moe": `MergeModulelist(dim=0)` then `Concatenate(dim=1)`). So the
same expert weight has a different name, shape and flat index in the checkpoint and in the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from spra_tools.testing import CORPUS, build_word_tokenizer

VOCAB, HIDDEN, LAYERS, HEADS, FFN, POSITIONS = 128, 64, 2, 4, 128, 64
PAD, UNK, BOS, EOS = 0, 1, 2, 3  # build_word_tokenizer's special ids
LABELS = ("negative", "neutral", "positive")  # three, so a head of the default two labels cannot pass
CUES = {"negative": ("bad", "awful"), "neutral": ("plain", "fine"), "positive": ("good", "great")}
WORDS = CORPUS.split() + [w for cues in CUES.values() for w in cues] + list(LABELS)
STORAGES = {  # name -> (dtype, max_shard_size)
    "bf16-sharded": (torch.bfloat16, "60KB"),
    "fp32": (torch.float32, None),
    "fp16": (torch.float16, None),
}

_DECODER = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    intermediate_size=FFN, max_position_embeddings=POSITIONS, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
)  # fmt: skip
_ENCODER = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    intermediate_size=FFN, max_position_embeddings=POSITIONS, pad_token_id=PAD,
)  # fmt: skip


@dataclass(frozen=True)
class Family:
    """One architecture: its real transformers classes and the hand-written spec of ``vo``."""

    name: str
    config: str  # transformers config class
    settings: dict  # config arguments
    base: str  # the bare base model class (what AutoModel loads)
    task: str  # the task model class the Hub holds for this family
    seq_cls: str | None  # its ForSequenceClassification class, if any
    decoder: bool
    vo: str  # regex: the checkpoint tensors (relative to a layer) that the vo preset must target
    embeddings: str  # regex: the input token embedding tensor
    notes: str = ""  # what the family exercises

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("causal-lm",) * self.decoder + ("seq-cls",) * (self.seq_cls is not None)


def _llama_like(name, config, prefix, *, vo=r"self_attn\.(v_proj|o_proj)\.weight$", kv=2, base=None, seq_cls=None,
                **kw) -> Family:  # fmt: skip
    settings = {**_DECODER, "num_key_value_heads": kv, **kw.pop("settings", {})}
    return Family(name, config, settings, base or f"{prefix}Model", f"{prefix}ForCausalLM",
                  seq_cls or f"{prefix}ForSequenceClassification", True, vo, r"embed_tokens\.weight$", **kw)  # fmt: skip


FAMILIES: tuple[Family, ...] = (
    _llama_like("llama", "LlamaConfig", "Llama", notes="grouped-query attention"),
    _llama_like("mistral", "MistralConfig", "Mistral", settings=dict(sliding_window=32), notes="sliding window"),
    _llama_like("qwen2", "Qwen2Config", "Qwen2", notes="q/k/v biases"),
    _llama_like("qwen3", "Qwen3Config", "Qwen3", settings=dict(head_dim=16), notes="q/k norms"),
    _llama_like("gemma2", "Gemma2Config", "Gemma2", kv=1,
                settings=dict(head_dim=16, sliding_window=32, query_pre_attn_scalar=16),
                notes="tied; the embedding is an nn.Embedding subclass that scales in its forward"),
    _llama_like("gemma3", "Gemma3TextConfig", "Gemma3", kv=1, base="Gemma3TextModel",
                seq_cls="Gemma3TextForSequenceClassification",
                settings=dict(head_dim=16, sliding_window=32, query_pre_attn_scalar=16),
                notes="text-only Gemma3TextConfig; tied, scaled embedding as Gemma 2"),
    _llama_like("phi3", "Phi3Config", "Phi3", vo=r"self_attn\.(qkv_proj|o_proj)\.weight$", kv=4,
                settings=dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
                notes="fused qkv_proj and gate_up_proj"),
    _llama_like("mixtral", "MixtralConfig", "Mixtral",
                settings=dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
                notes="MoE: fused 3-D experts in the model, per-expert w1/w2/w3 in the checkpoint"),
    _llama_like("qwen3_moe", "Qwen3MoeConfig", "Qwen3Moe",
                settings=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16,
                              decoder_sparse_step=1, mlp_only_layers=[]),
                notes="MoE: fused 3-D experts in the model, per-expert projections in the checkpoint"),
    Family("gpt2", "GPT2Config",
           dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS,
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS),
           "GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification", True,
           r"attn\.(c_attn|c_proj)\.weight$", r"wte\.weight$", notes="Conv1D, fused c_attn, tied"),
    Family("gpt_neox", "GPTNeoXConfig", {**_DECODER, "rotary_pct": 0.5},
           "GPTNeoXModel", "GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification", True,
           r"attention\.(query_key_value|dense)\.weight$", r"embed_in\.weight$", notes="fused query_key_value; checkpoint embed_out is lm_head once loaded"),
    Family("opt", "OPTConfig",
           dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                ffn_dim=FFN, word_embed_proj_dim=HIDDEN, max_position_embeddings=POSITIONS,
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS),
           "OPTModel", "OPTForCausalLM", "OPTForSequenceClassification", True,
           r"self_attn\.(v_proj|out_proj)\.weight$", r"embed_tokens\.weight$",
           notes="nested prefix model.decoder, tied"),
    Family("falcon", "FalconConfig",
           dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                max_position_embeddings=POSITIONS, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS),
           "FalconModel", "FalconForCausalLM", "FalconForSequenceClassification", True,
           r"self_attention\.(query_key_value|dense)\.weight$", r"word_embeddings\.weight$",
           notes="multi-query fused query_key_value, tied"),
    Family("bert", "BertConfig", dict(_ENCODER), "BertModel", "BertForPreTraining", "BertForSequenceClassification",
           False, r"attention\.(self\.value|output\.dense)\.weight$", r"word_embeddings\.weight$",
           notes="pooler + biased classifier; task layout as bert-base-uncased (BertForPreTraining)"),
    Family("roberta", "RobertaConfig", {**_ENCODER, "max_position_embeddings": POSITIONS + 2},
           "RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification",
           False, r"attention\.(self\.value|output\.dense)\.weight$", r"word_embeddings\.weight$",
           notes="two-layer head classifier.dense + classifier.out_proj"),
    Family("deberta_v2", "DebertaV2Config",
           {**_ENCODER, "relative_attention": True, "position_buckets": 16, "pos_att_type": ["p2c", "c2p"],
            "position_biased_input": False},
           "DebertaV2Model", "DebertaV2ForMaskedLM", "DebertaV2ForSequenceClassification",
           False, r"attention\.(self\.value_proj|output\.dense)\.weight$", r"word_embeddings\.weight$",
           notes="relative attention; head pooler.dense + classifier"),
    Family("distilbert", "DistilBertConfig",
           dict(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
                max_position_embeddings=POSITIONS, pad_token_id=PAD),
           "DistilBertModel", "DistilBertForMaskedLM", "DistilBertForSequenceClassification",
           False, r"attention\.(v_lin|out_lin)\.weight$", r"word_embeddings\.weight$",
           notes="head pre_classifier + classifier"),
    Family("modernbert", "ModernBertConfig",
           {**_ENCODER, "bos_token_id": BOS, "eos_token_id": EOS, "cls_token_id": BOS, "sep_token_id": EOS,
            "local_attention": 16, "global_attn_every_n_layers": 2},
           "ModernBertModel", "ModernBertForMaskedLM", "ModernBertForSequenceClassification",
           False, r"attn\.(Wqkv|Wo)\.weight$", r"tok_embeddings\.weight$",
           notes="fused Wqkv; head head.dense + head.norm + classifier"),
    Family("electra", "ElectraConfig", {**_ENCODER, "embedding_size": 32},
           "ElectraModel", "ElectraForPreTraining", "ElectraForSequenceClassification",
           False, r"attention\.(self\.value|output\.dense)\.weight$", r"word_embeddings\.weight$",
           notes="embedding projection; head classifier.dense + classifier.out_proj"),
)  # fmt: skip


@dataclass(frozen=True)
class Case:
    """A family saved in one layout and one storage."""

    family: Family
    layout: str  # "task" | "bare"
    storage: str  # a key of STORAGES

    @property
    def id(self) -> str:
        return f"{self.family.name}-{self.layout}-{self.storage}"

    @property
    def dtype(self) -> torch.dtype:
        return STORAGES[self.storage][0]

    @property
    def model_class(self) -> str:
        """The transformers class whose `save_pretrained` wrote the checkpoint."""
        return self.family.task if self.layout == "task" else self.family.base

    @property
    def tasks(self) -> tuple[str, ...]:
        """Training tasks that apply: causal-LM needs the task layout of a decoder (a bare decoder has
        no LM head to start from); seq-cls needs a ForSequenceClassification class."""
        return tuple(t for t in self.family.tasks if t == "seq-cls" or self.layout == "task")

    def task_class(self, task: str) -> str:
        """The transformers class that trains on this checkpoint for `task`."""
        return self.family.seq_cls if task == "seq-cls" else self.family.task

    def build(self, directory: Path, seed: int = 0) -> torch.nn.Module:
        """Save this case's checkpoint (and the word tokenizer) to `directory`; return the model."""
        import transformers

        transformers.utils.logging.disable_progress_bar()
        config = getattr(transformers, self.family.config)(**self.family.settings)
        torch.manual_seed(seed)
        model = getattr(transformers, self.model_class)(config)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():  # tied weights are one parameter: perturbed once
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        dtype, shard = STORAGES[self.storage]
        model = model.to(dtype)
        model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
        build_word_tokenizer(WORDS, directory)
        return model


def _cases() -> tuple[Case, ...]:
    """Every family in its task layout, every encoder (and three decoders) also bare; the storages
    rotate so each appears for decoders and encoders, sharded or not."""
    storages = list(STORAGES)
    bare_decoders = {"llama", "qwen2", "gpt2"}
    cases = []
    for i, f in enumerate(FAMILIES):
        cases.append(Case(f, "task", storages[i % 3]))
        if not f.decoder or f.name in bare_decoders:
            cases.append(Case(f, "bare", storages[(i + 1) % 3]))
    return tuple(cases)


CASES = _cases()


def write_data(directory: Path) -> dict[str, Path]:
    """Training files in `directory`: causal-LM texts and seq-cls records of the three LABELS
    (each text carries a cue word of its label), 16 records each."""
    import random

    rng = random.Random(0)
    words = CORPUS.split()
    causal = [" ".join(words[i : i + 12]) for i in range(0, 16 * 3, 3)]
    cls = []
    for i in range(16):
        label = LABELS[i % 3]
        text = [rng.choice(words) for _ in range(8)]
        text.insert(rng.randrange(9), rng.choice(CUES[label]))
        cls.append({"text": " ".join(text), "label": label})
    paths = {"causal-lm": directory / "causal.jsonl", "seq-cls": directory / "cls.jsonl"}
    paths["causal-lm"].write_text("".join(json.dumps({"text": t}) + "\n" for t in causal))
    paths["seq-cls"].write_text("".join(json.dumps(r) + "\n" for r in cls))
    return paths
