"""Training data for `spra-tools train`: a local file -> records -> token ids with loss labels -> mini-batches.

`records` reads JSON Lines, CSV, Parquet or a `datasets` save_to_disk directory; `tokenizing` turns
each record shape into ids and loss labels with the model's own tokenizer; `batches` serves seeded,
shuffled, resumable mini-batches, sliced per rank so any number of processes sees the same global
batches. Every problem with a file is one SpraError naming the file and the line or row.
"""

from .batches import Batches, collate, eval_batches
from .records import check_source, read_records
from .tokenizing import IGNORE, TokenizedData, tokenize

__all__ = ["IGNORE", "Batches", "TokenizedData", "check_source", "collate", "eval_batches", "read_records", "tokenize"]
