"""Records -> token ids with loss labels: each record shape tokenized with the model's own tokenizer.

The first record's keys tell the shape: {"text"} or {"prompt", "completion"} or {"messages"} for
causal-LM fine-tuning, {"text", "label"} for sequence classification. Ids come from the model's own
tokenizer (and its chat template), so training sees exactly what inference will.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import SpraError
from ..config import TASKS
from .records import json_kind, numbered_records

IGNORE = -100  # the label of positions without loss (what transformers' losses skip)
ROLES = ("system", "user", "assistant", "tool")
# Record shape by the known keys a record has; other keys (ids, sources, ...) are ignored.
SHAPES = {
    frozenset({"text"}): "text",
    frozenset({"prompt", "completion"}): "prompt-completion",
    frozenset({"messages"}): "chat",
    frozenset({"text", "label"}): "classification",
}
KNOWN_KEYS = frozenset().union(*SHAPES)


@dataclass(frozen=True)
class TokenizedData:
    """Examples ready for batching, with the counts a training log reports."""

    input_ids: list[list[int]]  # one list per example (after truncation / packing)
    labels: list[list[int]] | list[int]  # causal-lm: per token, IGNORE where no loss; seq-cls: one class id each
    id2label: dict[int, str] | None  # seq-cls only
    records: int  # records read
    truncated: int  # examples cut to max_length
    tokens: int  # tokens kept (no padding)
    loss_tokens: int  # causal-lm: predicted tokens (labels[1:] not IGNORE, as models shift); seq-cls: examples
    dropped: int = 0  # causal-lm examples (or packed chunks) left without any loss token by truncation


def tokenize(
    path: str | Path,
    tokenizer,
    task: str,
    max_length: int,
    packing: bool = False,
    label2id: dict[str, int] | None = None,
) -> TokenizedData:
    """Read `path` and tokenize it for `task` with `tokenizer` (a transformers tokenizer).

    causal-lm: {"text"} trains on every token; {"prompt", "completion"} only on the completion (the
    two are joined as one string, so put the separating space in one of them); {"messages"} is
    rendered with the tokenizer's chat template and trains on the assistant turns. A bos is added
    when the tokenizer has one but does not add it, and an eos ends text and completions.
    seq-cls: {"text", "label"}, labels as names or class ids; pass the training `label2id` when
    tokenizing evaluation data or resuming, so the ids agree.
    Examples longer than `max_length` keep their start. With `packing` (causal-lm), all examples
    form one stream cut into `max_length` chunks instead.
    """
    path = Path(path)
    if task not in TASKS:
        raise SpraError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if max_length < 2:
        raise SpraError(f"max_length must be at least 2, got {max_length}")
    if packing and task != "causal-lm":
        raise SpraError("packing is for causal-lm only")
    encoder = _Encoder(tokenizer, path)
    first: tuple[str, frozenset] | None = None
    examples: list[tuple[list[int], list[int]] | None] = []
    plain: list[tuple[int, str, str]] = []  # (example, where, text) of text / classification records
    labels: list[tuple[str, str | int]] = []
    records = 0
    for unit, n, record in numbered_records(path):
        where = f"{unit} {n}"
        keys = frozenset(record) & KNOWN_KEYS
        if first is None:
            first = (where, keys)
            _check_shape(keys, task, where, path)
        elif keys != first[1]:
            raise SpraError(
                f"{where}: has {_names(keys)} but {first[0]} has {_names(first[1])}; all records must have one shape",
                path,
            )
        records += 1
        shape = SHAPES[keys]
        if shape in ("text", "classification"):
            plain.append((len(examples), where, _string(record, "text", where, path)))
            examples.append(None)  # encoded below, all texts in one call
            if shape == "classification":
                labels.append((where, _label(record, where, path)))
        elif shape == "prompt-completion":
            prompt = _string(record, "prompt", where, path, allow_empty=True)
            examples.append(encoder.prompt_completion(prompt, _string(record, "completion", where, path), where))
        else:
            examples.append(encoder.chat(_messages(record, where, path), where))
    # One batched call: the tokenizer's Rust core encodes the texts in parallel.
    encoded = encoder.plain_many([text for _, _, text in plain], [where for _, where, _ in plain])
    for (i, _, _), ids in zip(plain, encoded):
        if task == "seq-cls":
            examples[i] = (ids, [])
        else:
            full = encoder.prefix + ids + encoder.suffix
            examples[i] = (full, list(full))

    if task == "seq-cls":
        ids_of, id2label = _label_ids(labels, label2id, path)
        input_ids = [ids[:max_length] for ids, _ in examples]
        return TokenizedData(
            input_ids=input_ids,
            labels=ids_of,
            id2label=id2label,
            records=records,
            truncated=sum(len(ids) > max_length for ids, _ in examples),
            tokens=sum(map(len, input_ids)),
            loss_tokens=len(input_ids),
        )

    if packing:
        stream_ids = [t for ids, _ in examples for t in ids]
        stream_labels = [t for _, lab in examples for t in lab]
        cut = range(0, len(stream_ids), max_length)
        pieces = [(stream_ids[i : i + max_length], stream_labels[i : i + max_length]) for i in cut]
        if len(pieces[-1][0]) < 2:
            pieces.pop()
        truncated = 0
    else:
        pieces = [(ids[:max_length], lab[:max_length]) for ids, lab in examples]
        truncated = sum(len(ids) > max_length for ids, _ in examples)
    # Position 0 predicts nothing (models shift labels): a piece needs a loss label after it.
    kept = [(ids, lab) for ids, lab in pieces if any(t != IGNORE for t in lab[1:])]
    if not kept:
        raise SpraError(
            f"no example has a token to learn within max_length {max_length}: truncation cut the loss tokens "
            f"of all {len(pieces):,}; use a larger --max-length",
            path,
        )
    return TokenizedData(
        input_ids=[ids for ids, _ in kept],
        labels=[lab for _, lab in kept],
        id2label=None,
        records=records,
        truncated=truncated,
        tokens=sum(len(ids) for ids, _ in kept),
        loss_tokens=sum(sum(t != IGNORE for t in lab[1:]) for _, lab in kept),
        dropped=len(pieces) - len(kept),
    )


def _check_shape(keys: frozenset, task: str, where: str, path: Path) -> None:
    shape = SHAPES.get(keys)
    if shape is None:
        raise SpraError(
            f"{where}: cannot tell the record shape from {_names(keys)}; expected fields "
            '"text", "prompt" + "completion" or "messages" (causal-lm), or "text" + "label" (seq-cls)',
            path,
        )
    if task == "seq-cls" and shape != "classification":
        raise SpraError(f'{where}: seq-cls needs records with "text" and "label", this one has {_names(keys)}', path)
    if task == "causal-lm" and shape == "classification":
        raise SpraError(f'{where}: records with a "label" are for seq-cls, not causal-lm', path)


def _names(keys: frozenset) -> str:
    return ", ".join(f'"{k}"' for k in sorted(keys)) or "none of the known fields"


def _string(record: dict, key: str, where: str, path: Path, allow_empty: bool = False) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise SpraError(f'{where}: "{key}" must be a string, got {json_kind(value)}', path)
    if not allow_empty and not value.strip():
        raise SpraError(f'{where}: empty "{key}"', path)
    return value


def _messages(record: dict, where: str, path: Path) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise SpraError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects', path)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise SpraError(f'{where}: message {i} must be an object with "role" and "content"', path)
        if message["role"] not in ROLES:
            raise SpraError(
                f"{where}: message {i} has unknown role {message['role']!r}; expected one of {', '.join(ROLES)}", path
            )
        if not isinstance(message["content"], str):
            raise SpraError(
                f'{where}: message {i}: "content" must be a string, got {json_kind(message["content"])}', path
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise SpraError(f"{where}: no assistant message, so nothing to learn", path)
    return messages


def _label(record: dict, where: str, path: Path) -> str | int:
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise SpraError(
            f'{where}: "label" must be a name (string) or a class id (integer), got {json_kind(label)}', path
        )
    if isinstance(label, int) and label < 0:
        raise SpraError(f"{where}: negative class id {label}", path)
    if isinstance(label, str) and not label.strip():
        raise SpraError(f'{where}: empty "label"', path)
    return label


def _label_ids(
    labels: list[tuple[str, str | int]], label2id: dict[str, int] | None, path: Path
) -> tuple[list[int], dict[int, str]]:
    """Class ids of the labels, and id2label: `label2id`'s if given, else ids as is or names sorted."""
    kind = type(labels[0][1])
    for where, label in labels:
        if type(label) is not kind:
            raise SpraError(
                f"{where}: label {label!r} is {json_kind(label)} but {labels[0][0]} has {json_kind(labels[0][1])}; "
                "use names throughout or class ids throughout",
                path,
            )
    if label2id is None:
        if kind is int:
            id2label = {i: str(i) for i in range(max(label for _, label in labels) + 1)}
            return [label for _, label in labels], id2label
        names = sorted({label for _, label in labels})
        label2id = {name: i for i, name in enumerate(names)}
    id2label = {i: name for name, i in label2id.items()}
    ids = []
    for where, label in labels:
        i = label if isinstance(label, int) and label in id2label else label2id.get(label)
        if i is None:
            known = ", ".join(repr(name) for name in label2id)
            raise SpraError(f"{where}: label {label!r} is not one of the training labels ({known})", path)
        ids.append(i)
    return ids, id2label


class _Encoder:
    """Token ids and loss labels of each record shape, with one tokenizer."""

    def __init__(self, tokenizer, path: Path):
        self.tokenizer = tokenizer
        self.path = path
        # Whether the tokenizer adds bos/eos itself shows in one probe: with and without special tokens.
        plain = self.encode("a", specials=False)
        full = self.encode("a", specials=True)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        adds = len(full) > len(plain)
        self.prefix = [bos] if bos is not None and not (adds and full[0] == bos) else []
        self.suffix = [eos] if eos is not None and not (adds and full[-1] == eos) else []

    def encode(self, text: str, specials: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=specials)["input_ids"]

    def plain_many(self, texts: list[str], wheres: list[str]) -> list[list[int]]:
        """`plain` of many texts in one call."""
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for ids, where in zip(encoded, wheres):
            if not ids:
                raise SpraError(f'{where}: "text" encodes to no tokens', self.path)
        return encoded

    def prompt_completion(self, prompt: str, completion: str, where: str) -> tuple[list[int], list[int]]:
        full = self.encode(prompt + completion, specials=True)
        alone = self.encode(prompt, specials=True)
        # The loss starts at the first token that differs from the prompt's own encoding: a token
        # spanning the boundary (e.g. a trailing space merged into the completion's first word) is
        # part of what the model must produce.
        k = 0
        while k < min(len(alone), len(full)) and alone[k] == full[k]:
            k += 1
        if k == len(full):
            raise SpraError(f'{where}: "completion" encodes to no tokens', self.path)
        ids = self.prefix + full + self.suffix
        labels = [IGNORE] * (len(self.prefix) + k) + full[k:] + self.suffix
        return ids, labels

    def chat(self, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
        """The rendered conversation; loss on each assistant turn: the tokens between the render of
        the turns before it (plus the generation prompt) and the render including it."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise SpraError('the tokenizer has no chat template, which "messages" records need', self.path)
        ids = self.render(messages, False, where)
        labels = [IGNORE] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], True, where)
            upto = self.render(messages[: i + 1], False, where)
            if ids[: len(before)] != before or ids[: len(upto)] != upto or len(upto) < len(before):
                raise SpraError(
                    f"{where}: the chat template is not prefix-stable (the conversation up to message {i} "
                    "does not render as the start of the whole), so the assistant's tokens cannot be found",
                    self.path,
                )
            labels[len(before) : len(upto)] = ids[len(before) : len(upto)]
        return ids, labels

    def render(self, messages: list[dict], generation_prompt: bool, where: str) -> list[int]:
        import jinja2

        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except (jinja2.TemplateError, ValueError) as e:
            raise SpraError(f"{where}: the chat template failed: {e}", self.path) from None
        # The template writes its own special tokens (bos, turn markers).
        return self.encode(text, specials=False)
