"""Training data: reading every file format, tokenizing every record shape (checked against the
tokenizer's own encoding and chat template), one-line errors, and seeded, resumable, DDP-sliced batches."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from spra_tools.errors import SpraError
from spra_tools.testing import build_word_tokenizer
from spra_tools.train.data import IGNORE, Batches, TokenizedData, eval_batches, read_records, tokenize

WORDS = "the cat sat on mat a dog log bird sang in tree . what did ? it you are good bad neutral hello hi yes no"
TEXTS = ["the cat sat on the mat .", "a dog sat on a log .", "a bird sang in the tree .", "hello"]
CHAT = [
    {"role": "system", "content": "you are good"},
    {"role": "user", "content": "what did the cat sat on ?"},
    {"role": "assistant", "content": "the mat ."},
    {"role": "user", "content": "the dog ?"},
    {"role": "assistant", "content": "a log ."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_word_tokenizer([WORDS], tmp_path_factory.mktemp("tok"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def loss_spans(ids, labels):
    """Contiguous runs of positions with loss, as token lists."""
    spans, run = [], []
    for t, label in zip(ids, labels):
        if label != IGNORE:
            assert label == t
            run.append(t)
        elif run:
            spans.append(run)
            run = []
    return spans + ([run] if run else [])


# --- the word tokenizer -------------------------------------------------------------------------


def test_word_tokenizer_layout(tmp_path):
    import transformers

    tok = build_word_tokenizer(["the cat sat", "the dog ."], tmp_path / "t", chat_template=False)
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == [
        "<pad>",
        "<unk>",
        "<s>",
        "</s>",
        "the",
        "cat",
        "sat",
        "dog",
        ".",
    ]
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.chat_template is None
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    assert encode(loaded, "the cat sat <s> zebra") == [4, 5, 6, 2, 1]
    with pytest.raises(ValueError, match="257"):
        build_word_tokenizer([f"w{i}" for i in range(253)], chat_template=False)


# --- record shapes ------------------------------------------------------------------------------


def test_text_records(tmp_path, tok):
    data = tokenize(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS]), tok, "causal-lm", 64)
    assert data.input_ids == [[tok.bos_token_id, *encode(tok, t), tok.eos_token_id] for t in TEXTS]
    assert data.labels == data.input_ids
    assert (data.records, data.truncated, data.dropped, data.id2label) == (4, 0, 0, None)
    assert data.tokens == sum(map(len, data.input_ids))
    assert data.loss_tokens == data.tokens - len(TEXTS)  # the first token of each is predicted by nothing


def test_prompt_completion(tmp_path, tok):
    records = [
        {"prompt": "what did the cat sat on ?", "completion": " the mat ."},
        {"prompt": "", "completion": "hello"},
        {"prompt": "what did the dog sat on ? a", "completion": " log .", "source": "extra fields are ignored"},
    ]
    data = tokenize(write_jsonl(tmp_path / "d.jsonl", records), tok, "causal-lm", 64)
    for ids, labels, r in zip(data.input_ids, data.labels, records):
        assert ids == [tok.bos_token_id, *encode(tok, r["prompt"] + r["completion"]), tok.eos_token_id]
        (span,) = loss_spans(ids, labels)
        assert span[-1] == tok.eos_token_id
        assert tok.decode(span, skip_special_tokens=True) == r["completion"].strip()
        assert labels[: len(ids) - len(span)] == [IGNORE] * (len(ids) - len(span))


def test_a_tokenizer_adding_bos_itself_gets_no_second_one(tmp_path):
    from tokenizers import processors

    tok = build_word_tokenizer([WORDS])
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    records = [{"prompt": "the cat", "completion": " sat"}]
    data = tokenize(write_jsonl(tmp_path / "d.jsonl", records), tok, "causal-lm", 64)
    assert data.input_ids == [[2, *encode(tok, "the cat sat"), 3]]
    assert data.labels == [[IGNORE, IGNORE, IGNORE, *encode(tok, "sat"), 3]]


def test_prompt_completion_token_across_the_boundary(tmp_path, tok):
    # "ca" + "t sat" is the word "cat": the token spanning the boundary belongs to the completion.
    data = tokenize(
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the ca", "completion": "t sat"}]), tok, "causal-lm", 64
    )
    (span,) = loss_spans(data.input_ids[0], data.labels[0])
    assert tok.decode(span, skip_special_tokens=True) == "cat sat"


def test_chat(tmp_path, tok):
    data = tokenize(
        write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}]), tok, "causal-lm", 64
    )
    for ids, labels, messages in zip(data.input_ids, data.labels, [CHAT, CHAT[1:3]]):
        assert ids == encode(tok, tok.apply_chat_template(messages, tokenize=False))
        spans = loss_spans(ids, labels)
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [tok.decode(s, skip_special_tokens=True) for s in spans] == assistant
        assert all(s[-1] == tok.eos_token_id for s in spans)  # the turn's end marker is learnt too


def test_chat_without_template(tmp_path, tok):
    plain = build_word_tokenizer([WORDS], chat_template=False)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    with pytest.raises(SpraError, match="no chat template"):
        tokenize(path, plain, "causal-lm", 64)


def test_chat_template_not_prefix_stable(tmp_path):
    # Says "hello" first once a conversation has more than two messages: earlier turns shift.
    tok = build_word_tokenizer([WORDS])
    tok.chat_template = "{% if messages|length > 2 %}hello {% endif %}" + tok.chat_template
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    with pytest.raises(SpraError, match="line 1: the chat template is not prefix-stable") as e:
        tokenize(path, tok, "causal-lm", 64)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    ("labels", "label2id", "ids", "id2label"),
    [
        (["neutral", "bad", "good", "bad"], None, [2, 0, 1, 0], {0: "bad", 1: "good", 2: "neutral"}),
        ([2, 0, 2, 0], None, [2, 0, 2, 0], {0: "0", 1: "1", 2: "2"}),
        (["bad", "good"], {"good": 0, "bad": 1, "neutral": 2}, [1, 0], {0: "good", 1: "bad", 2: "neutral"}),
        ([1, 0], {"no": 0, "yes": 1}, [1, 0], {0: "no", 1: "yes"}),
    ],
)
def test_seq_cls_labels(tmp_path, tok, labels, label2id, ids, id2label):
    records = [{"text": TEXTS[i], "label": label} for i, label in enumerate(labels)]
    data = tokenize(write_jsonl(tmp_path / "d.jsonl", records), tok, "seq-cls", 64, label2id=label2id)
    assert data.input_ids == [tok(r["text"])["input_ids"] for r in records]
    assert (data.labels, data.id2label) == (ids, id2label)
    assert (data.records, data.loss_tokens, data.tokens) == (len(labels), len(labels), sum(map(len, data.input_ids)))


def test_seq_cls_eval_data_uses_the_training_mapping(tmp_path, tok):
    train = tokenize(
        write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "good"}, {"text": "b", "label": "bad"}]),
        tok,
        "seq-cls",
        8,
    )
    label2id = {name: i for i, name in train.id2label.items()}
    evaluation = tokenize(
        write_jsonl(tmp_path / "eval.jsonl", [{"text": "c", "label": "good"}]), tok, "seq-cls", 8, label2id=label2id
    )
    assert evaluation.labels == [label2id["good"]] == [1]
    path = write_jsonl(tmp_path / "eval2.jsonl", [{"text": "c", "label": "good"}, {"text": "c", "label": "ugly"}])
    with pytest.raises(SpraError, match="line 2: label 'ugly' is not one of the training labels"):
        tokenize(path, tok, "seq-cls", 8, label2id=label2id)


# --- file formats ------------------------------------------------------------------------------

RECORDS = [{"text": t, "label": label} for t, label in zip(TEXTS, ["good", "bad", "good", "neutral"])]


def test_formats_read_alike(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    paths = [
        write_jsonl(tmp_path / "d.jsonl", RECORDS),
        tmp_path / "d.csv",
        tmp_path / "d.json",
        tmp_path / "d.parquet",
    ]
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(RECORDS)
    paths[2].write_text(json.dumps(RECORDS, indent=1))
    pq.write_table(pa.Table.from_pylist(RECORDS), paths[3])
    datasets.Dataset.from_list(RECORDS).save_to_disk(tmp_path / "ds")
    extra = datasets.Dataset.from_list(RECORDS[:1])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS), "test": extra}).save_to_disk(tmp_path / "dd")
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(RECORDS)}).save_to_disk(tmp_path / "one")
    paths += [tmp_path / "ds", tmp_path / "dd", tmp_path / "one"]

    assert [r for _, r in read_records(paths[0])] == RECORDS
    reference = tokenize(paths[0], tok, "seq-cls", 64)
    for path in paths:
        assert [r for _, r in read_records(path)] == RECORDS, path
        assert tokenize(path, tok, "seq-cls", 64) == reference, path
    assert [w for w, _ in read_records(paths[0])] == ["d.jsonl:1", "d.jsonl:2", "d.jsonl:3", "d.jsonl:4"]
    assert [w for w, _ in read_records(paths[1])][:2] == ["d.csv:2", "d.csv:3"]
    assert [w for w, _ in read_records(paths[3])][:2] == ["d.parquet[0]", "d.parquet[1]"]

    datasets.DatasetDict({"a": extra, "b": extra}).save_to_disk(tmp_path / "two")
    with pytest.raises(SpraError, match="splits \\['a', 'b'\\] and none named 'train'"):
        tokenize(tmp_path / "two", tok, "seq-cls", 64)


def test_csv_integer_labels_and_blank_jsonl_lines(tmp_path, tok):
    (tmp_path / "d.csv").write_text('text,label\n"the cat, sat",1\nhello,0\n')
    data = tokenize(tmp_path / "d.csv", tok, "seq-cls", 64)
    assert (data.labels, data.id2label) == ([1, 0], {0: "0", 1: "1"})
    (tmp_path / "d.jsonl").write_text('\n{"text": "hello"}\n\n  \n{"text": "a dog"}\n')
    assert [w for w, _ in read_records(tmp_path / "d.jsonl")] == ["d.jsonl:2", "d.jsonl:5"]


# --- length handling ---------------------------------------------------------------------------


def test_truncation_keeps_the_start(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    full = tokenize(path, tok, "causal-lm", 64)
    cut = tokenize(path, tok, "causal-lm", 5)
    assert cut.input_ids == [ids[:5] for ids in full.input_ids]
    assert cut.labels == [labels[:5] for labels in full.labels]
    assert cut.truncated == sum(len(ids) > 5 for ids in full.input_ids) == 3
    cls = tokenize(write_jsonl(tmp_path / "c.jsonl", RECORDS), tok, "seq-cls", 3)
    assert (cls.truncated, cls.input_ids[0]) == (3, tok(TEXTS[0])["input_ids"][:3])


def test_truncation_drops_examples_left_without_loss(tmp_path, tok):
    records = [{"prompt": "the cat sat on the mat", "completion": " yes"}, {"prompt": "hi", "completion": " no"}]
    data = tokenize(write_jsonl(tmp_path / "d.jsonl", records), tok, "causal-lm", 4)
    assert (data.records, data.truncated, data.dropped, len(data.input_ids)) == (2, 1, 1, 1)
    assert data.input_ids == [[tok.bos_token_id, *encode(tok, "hi no"), tok.eos_token_id]]
    with pytest.raises(SpraError, match="no example has a token to learn within max_length 4"):
        tokenize(write_jsonl(tmp_path / "e.jsonl", records[:1]), tok, "causal-lm", 4)


def test_packing_preserves_the_token_stream(tmp_path, tok):
    records = [{"prompt": "hi", "completion": " " + t} for t in TEXTS]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    whole = tokenize(path, tok, "causal-lm", 64)
    stream = [t for ids in whole.input_ids for t in ids]
    stream_labels = [t for labels in whole.labels for t in labels]
    packed = tokenize(path, tok, "causal-lm", 7, packing=True)
    assert all(len(ids) == 7 for ids in packed.input_ids[:-1]) and 2 <= len(packed.input_ids[-1]) <= 7
    assert [t for ids in packed.input_ids for t in ids] == stream
    assert [t for labels in packed.labels for t in labels] == stream_labels
    assert (packed.records, packed.truncated, packed.dropped, packed.tokens) == (4, 0, 0, len(stream))
    # A last chunk of one token is dropped: it has nothing to predict.
    single = tokenize(path, tok, "causal-lm", len(stream) - 1, packing=True)
    assert single.input_ids == [stream[:-1]]


# --- errors ------------------------------------------------------------------------------------

ERRORS = [
    ("d.txt", "hello\n", "causal-lm", "unknown data format '.txt'"),
    ("d.jsonl", "", "causal-lm", "no records"),
    ("d.jsonl", "\n\n", "causal-lm", "no records"),
    ("d.jsonl", '{"text": "a"}\n{"text": "b",}\n', "causal-lm", "line 2: invalid JSON"),
    ("d.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', "causal-lm", "line 2: not UTF-8 text"),
    (
        "d.jsonl",
        '{"text": "a"}\n[1, 2]\n',
        "causal-lm",
        "line 2: a record must be an object with named fields, got a list",
    ),
    ("d.jsonl", '{"text": "a"}\n{"text": " "}\n', "causal-lm", 'line 2: empty "text"'),
    ("d.jsonl", '{"text": 3}\n', "causal-lm", 'line 1: "text" must be a string, got a number'),
    (
        "d.jsonl",
        '{"prompt": "a", "completion": null}\n',
        "causal-lm",
        'line 1: "completion" must be a string, got null',
    ),
    ("d.jsonl", '{"prompt": "a", "completion": ""}\n', "causal-lm", 'line 1: empty "completion"'),
    (
        "d.jsonl",
        '{"text": "a"}\n{"prompt": "a", "completion": "b"}\n',
        "causal-lm",
        'line 2: has "completion", "prompt" but line 1 has "text"',
    ),
    ("d.jsonl", '{"text": "a"}\n{"txt": "a"}\n', "causal-lm", "line 2: has none of the known fields but line 1"),
    ("d.jsonl", '{"body": "a"}\n', "causal-lm", "line 1: cannot tell the record shape"),
    ("d.jsonl", '{"prompt": "a"}\n', "causal-lm", "line 1: cannot tell the record shape"),
    ("d.jsonl", '{"messages": "hi"}\n', "causal-lm", 'line 1: "messages" must be a non-empty list'),
    (
        "d.jsonl",
        '{"messages": [{"role": "user"}]}\n',
        "causal-lm",
        'line 1: message 0 must be an object with "role" and "content"',
    ),
    (
        "d.jsonl",
        '{"messages": [{"role": "bot", "content": "a"}]}\n',
        "causal-lm",
        "line 1: message 0 has unknown role 'bot'",
    ),
    (
        "d.jsonl",
        '{"messages": [{"role": "user", "content": ["a"]}]}\n',
        "causal-lm",
        'line 1: message 0: "content" must be a string',
    ),
    ("d.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n', "causal-lm", "line 1: no assistant message"),
    ("d.jsonl", '{"text": "a", "label": "good"}\n', "causal-lm", 'line 1: records with a "label" are for seq-cls'),
    ("d.jsonl", '{"text": "a"}\n', "seq-cls", 'line 1: seq-cls needs records with "text" and "label"'),
    ("d.jsonl", '{"text": "a", "label": 1.5}\n', "seq-cls", 'line 1: "label" must be a name (string) or a class id'),
    ("d.jsonl", '{"text": "a", "label": true}\n', "seq-cls", 'line 1: "label" must be a name'),
    ("d.jsonl", '{"text": "a", "label": -1}\n', "seq-cls", "line 1: negative class id -1"),
    (
        "d.jsonl",
        '{"text": "a", "label": "x"}\n{"text": "b", "label": 2}\n',
        "seq-cls",
        "line 2: label 2 is a number but line 1 has a string",
    ),
    ("d.csv", "text,label\na,good\nb,bad,extra\n", "seq-cls", "line 3: more fields than the header has columns"),
    ("d.csv", "text,label\na,good\nb\n", "seq-cls", "line 3: fewer fields than the header has columns"),
    ("d.csv", "text,label\n", "seq-cls", "no records"),
    ("d.json", '[{"text": "a"}, 3]', "causal-lm", "record 1: a record must be an object"),
    ("d.json", '[{"text": "a"},\n {"text": "b"}', "causal-lm", "line 2: invalid JSON"),
]


@pytest.mark.parametrize(("name", "content", "task", "message"), ERRORS, ids=[e[3] for e in ERRORS])
def test_errors_name_the_file_and_line(tmp_path, tok, name, content, task, message):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(SpraError) as e:
        tokenize(path, tok, task, 64)
    assert message in str(e.value)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_errors_about_paths(tmp_path, tok):
    with pytest.raises(SpraError, match="no such file or directory") as e:
        tokenize(tmp_path / "missing.jsonl", tok, "causal-lm", 64)
    assert e.value.path == str(tmp_path / "missing.jsonl")
    with pytest.raises(SpraError, match="written by datasets' save_to_disk"):
        tokenize(tmp_path, tok, "causal-lm", 64)
    pytest.importorskip("pyarrow")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SpraError, match="not a readable Parquet file"):
        tokenize(tmp_path / "bad.parquet", tok, "causal-lm", 64)


def test_option_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    with pytest.raises(SpraError, match="unknown task 'lm'"):
        tokenize(path, tok, "lm", 64)
    with pytest.raises(SpraError, match="packing is for causal-lm only"):
        tokenize(path, tok, "seq-cls", 64, packing=True)
    with pytest.raises(SpraError, match="max_length must be at least 2"):
        tokenize(path, tok, "seq-cls", 1)


# --- batches -----------------------------------------------------------------------------------


def numbered(n: int) -> TokenizedData:
    """Example i is the token i + 10 repeated 1 + i % 3 times, so a batch shows which examples it holds."""
    ids = [[i + 10] * (1 + i % 3) for i in range(n)]
    return TokenizedData(ids, [list(x) for x in ids], None, n, 0, sum(map(len, ids)), 0)


def examples_of(batch) -> list[int]:
    return (batch["input_ids"][:, 0] - 10).tolist()


def take(batches, k):
    return [next(batches) for _ in range(k)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def test_batches_padding_and_labels():
    data = numbered(6)
    (batch,) = take(Batches(data, 3, seed=0, pad_id=0, task="causal-lm", shuffle=False), 1)
    assert batch["input_ids"].tolist() == [[10, 0, 0], [11, 11, 0], [12, 12, 12]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [[10, IGNORE, IGNORE], [11, 11, IGNORE], [12, 12, 12]]
    assert all(t.dtype == torch.long for t in batch.values())
    cls = TokenizedData(data.input_ids, [1, 0, 2, 1, 0, 2], {0: "a", 1: "b", 2: "c"}, 6, 0, 12, 6)
    (batch,) = take(Batches(cls, 2, seed=0, pad_id=7, task="seq-cls", shuffle=False), 1)
    assert batch["labels"].tolist() == [1, 0] and batch["input_ids"].tolist() == [[10, 7], [11, 11]]


def test_batches_epochs_are_seeded_permutations():
    data = numbered(10)
    batches = Batches(data, 3, seed=1, pad_id=0, task="causal-lm")
    assert batches.steps_per_epoch == 3
    epochs = []
    for _ in range(3):
        epochs.append([i for batch in take(batches, 3) for i in examples_of(batch)])
        assert batches.epoch == len(epochs)
    assert batches.examples_seen == 27
    assert all(len(set(e)) == 9 for e in epochs) and len({tuple(e) for e in epochs}) == 3
    again = Batches(data, 3, seed=1, pad_id=0, task="causal-lm")
    assert same(take(again, 9), take(Batches(data, 3, seed=1, pad_id=0, task="causal-lm"), 9))
    other = [examples_of(b) for b in take(Batches(data, 3, seed=2, pad_id=0, task="causal-lm"), 3)]
    assert other != [epochs[0][i : i + 3] for i in (0, 3, 6)]
    ordered = [examples_of(b) for b in take(Batches(data, 3, seed=1, pad_id=0, task="causal-lm", shuffle=False), 4)]
    assert ordered == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]


def test_batches_resume_bit_exactly_across_epochs():
    data = numbered(10)
    for k in (0, 2, 3, 4, 7):  # 3 steps per epoch: before, at and after epoch boundaries
        first = Batches(data, 3, seed=5, pad_id=0, task="causal-lm")
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = Batches(data, 3, seed=5, pad_id=0, task="causal-lm")
        resumed.load_state_dict(state)
        assert (resumed.epoch, resumed.examples_seen) == (first.epoch, first.examples_seen) == (k // 3, 3 * k)
        assert same(take(resumed, 5), take(first, 5))
    with pytest.raises(SpraError, match="cannot resume the data order"):
        Batches(numbered(11), 3, seed=5, pad_id=0, task="causal-lm").load_state_dict(state)


def test_batches_ranks_slice_the_global_batch():
    data = numbered(11)
    single = take(Batches(data, 4, seed=3, pad_id=0, task="causal-lm"), 6)
    ranks = [take(Batches(data, 2, seed=3, pad_id=0, task="causal-lm", rank=r, world_size=2), 6) for r in (0, 1)]
    for whole, a, b in zip(single, *ranks):
        assert examples_of(whole) == examples_of(a) + examples_of(b)
        width = a["input_ids"].shape[1]
        assert torch.equal(whole["labels"][:2, :width], a["labels"])
    # A checkpoint of 2 processes resumes on 1 (positions count examples, not steps).
    two = Batches(data, 2, seed=3, pad_id=0, task="causal-lm", rank=0, world_size=2)
    take(two, 3)
    one = Batches(data, 4, seed=3, pad_id=0, task="causal-lm")
    one.load_state_dict(two.state_dict())
    assert same(take(one, 3), single[3:])


def ragged(n: int, seed: int = 0) -> TokenizedData:
    """Example i is token i + 10 repeated a random 1..40 times."""
    rng = np.random.default_rng(seed)
    ids = [[i + 10] * int(rng.integers(1, 41)) for i in range(n)]
    return TokenizedData(ids, [list(x) for x in ids], None, n, 0, sum(map(len, ids)), 0)


def test_grouped_batches_pad_less_and_keep_every_promise():
    data = ragged(1000)
    kw = dict(seed=4, pad_id=0, task="causal-lm")

    def padding(batches):
        return 1 - sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["input_ids"].numel() for b in batches)

    plain, grouped = take(Batches(data, 8, **kw), 125), take(Batches(data, 8, group_by_length=True, **kw), 125)
    assert padding(grouped) < 0.1 < 0.4 < padding(plain)
    epoch = sorted(i for b in grouped for i in examples_of(b))
    assert epoch == list(range(1000))  # one epoch still serves every example once
    again = Batches(data, 8, group_by_length=True, **kw)
    assert same(take(again, 125), grouped)  # seeded
    nxt = take(again, 125)  # the next epoch: another order
    assert [examples_of(b) for b in nxt] != [examples_of(b) for b in grouped]
    ranks = [take(Batches(data, 4, group_by_length=True, rank=r, world_size=2, **kw), 125) for r in (0, 1)]
    for whole, a, b in zip(grouped, *ranks):  # global batches independent of the process count
        assert examples_of(whole) == examples_of(a) + examples_of(b)
    first = Batches(data, 8, group_by_length=True, **kw)
    take(first, 70)
    resumed = Batches(data, 8, group_by_length=True, **kw)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert same(take(resumed, 100), take(first, 100))


def test_batches_pad_to_a_multiple():
    (batch,) = take(Batches(numbered(6), 3, seed=0, pad_id=0, task="causal-lm", shuffle=False, pad_to=8), 1)
    assert batch["input_ids"].shape == (3, 8) and batch["attention_mask"][:, 3:].sum() == 0
    assert bool((batch["labels"][:, 3:] == IGNORE).all())


def test_batches_need_one_global_batch():
    with pytest.raises(SpraError, match="5 examples are fewer than one batch of 6 \\(3 per process x 2 processes\\)"):
        Batches(numbered(5), 3, seed=0, pad_id=0, task="causal-lm", world_size=2)


def test_eval_batches_cover_every_example_once():
    data = numbered(7)
    batches = list(eval_batches(data, 3, pad_id=0, task="causal-lm"))
    assert [examples_of(b) for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches[2]["input_ids"].tolist() == [[16]]
