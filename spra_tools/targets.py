"""Which base tensors an adapter targets: named presets over Hugging Face tensor names, or regexes.

Presets (matched against checkpoint tensor names, so they work without loading the model):

* ``vo``  — attention value and output projections (the SpaRTA paper's choice). Architectures with
  a fused QKV matrix (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``, Falcon/NeoX ``query_key_value``,
  ModernBERT ``Wqkv``) have no separate V tensor: there the fused matrix is targeted.
* ``attn`` — all attention projections; ``mlp`` — all feed-forward projections;
* ``all-linear`` — every 2-D weight of the numbered transformer layers (``model.layers.N``,
  ``encoder.layer.N``, ``h.N``...): no embedding, and no head outside them — neither the output
  head nor a pretraining head (BERT's ``cls.predictions``, ELECTRA's ``discriminator_predictions``);
* ``all`` — every floating-point tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import SpraError
from .format import FLOAT_DTYPES

_W = r"\.weight$"
_VO = (
    r"(\.v_proj|\.o_proj|\.out_proj|attention\.self\.value(_proj)?|attention\.output\.dense|attn\.c_attn"
    r"|attn\.c_proj|\.qkv_proj|query_key_value|self_attn\.dense|self_attention\.dense|attention\.dense"
    r"|attention\.(v_lin|out_lin)|attn\.(Wqkv|Wo)|Attention\.[vo])" + _W
)
_QK = r"(\.q_proj|\.k_proj|attention\.self\.(query|key)(_proj)?|attention\.[qk]_lin|Attention\.[qk])" + _W
_MLP = (
    r"(\.gate_proj|\.up_proj|\.down_proj|\.gate_up_proj|mlp\.c_fc|mlp\.c_proj|intermediate\.dense"
    r"|(?<!attention)\.output\.dense|\.fc1|\.fc2|dense_h_to_4h|dense_4h_to_h|DenseReluDense\.w\w*"
    r"|ffn\.lin[12]|mlp\.(Wi|Wo))" + _W
)
_IN_BLOCK = re.compile(r"\.\d+\.")  # a tensor of a numbered layer: model.layers.3..., encoder.layer.0...
_EMBED_OR_HEAD = re.compile(
    r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|^shared\.|lm_head|^score\.|classifier|pooler)"
)

PRESETS = ("vo", "attn", "mlp", "all-linear", "all")


def _preset_matcher(preset: str):
    if preset == "all":
        return lambda name, shape: True
    if preset == "all-linear":
        return lambda name, shape: (
            len(shape) == 2
            and name.endswith(".weight")
            and bool(_IN_BLOCK.search(name))
            and not _EMBED_OR_HEAD.search(name)
        )
    pattern = {"vo": _VO, "attn": f"{_VO}|{_QK}", "mlp": _MLP}[preset]
    regex = re.compile(pattern)
    return lambda name, shape: len(shape) == 2 and bool(regex.search(name))


def _matcher(target: str):
    if target in PRESETS:
        return _preset_matcher(target)
    try:
        regex = re.compile(target)
    except re.error as e:
        raise SpraError(
            f"--targets {target!r} is neither a preset ({', '.join(PRESETS)}) nor a valid regex: {e}"
        ) from None
    return lambda name, shape: bool(regex.search(name))


def select(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]],
    targets: Iterable[str] = ("vo",),
    exclude: Iterable[str] = (),
    where: str | None = None,
) -> list[str]:
    """Names of floating-point tensors (name, dtype, shape) matched by any target and no exclude regex.

    `where` names the checkpoint in the error raised when nothing matches.
    """
    matchers = [_matcher(t) for t in targets]
    try:
        excludes = [re.compile(e) for e in exclude]
    except re.error as e:
        raise SpraError(f"--exclude is not a valid regex: {e}") from None
    chosen = [
        name
        for name, dtype, shape in tensors
        if dtype in FLOAT_DTYPES and any(m(name, shape) for m in matchers) and not any(e.search(name) for e in excludes)
    ]
    if not chosen:
        raise SpraError(f"no floating-point tensor matches --targets {' '.join(targets)}", where)
    return chosen
