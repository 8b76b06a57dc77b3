"""Column contracts of the two Parquet tables each shard carries.

`samples.parquet`: one row per stored sample, in the shard's row order.
`rejects.parquet`: one row per sample the writer refused, with the reason.
Types are Arrow type names; `schemas` stays free of pyarrow, the store builds the
Arrow schema from these.
"""

from __future__ import annotations

# (column, arrow type, meaning)
SAMPLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("sample_id", "string", "Unique id of the sample across the cache."),
    ("source", "string", "Where the sample came from: file and record index, or a built-in data set and split."),
    ("images", "list<string>", "Image references: 'path:<relative path under data.image_root>' or 'sha256:<hex>'."),
    ("messages", "string", "The prompt conversation as JSON: a list of {role, content} turns, content a string "
     "or a list of {type: text|image} parts; the answer turn is not included."),
    ("answer", "string", "The answer text the targets were made from (without the end-of-turn token)."),
    ("shard", "string", "Name of the shard holding the arrays."),
    ("row", "int32", "Row of the sample inside its shard."),
    ("num_tokens", "int32", "Stored positions (answer tokens + end-of-turn)."),
    ("num_question_tokens", "int32", "Stored question positions (0 when none)."),
)

REJECT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("sample_id", "string", "Id of the refused sample."),
    ("source", "string", "Where the sample came from."),
    ("stage", "string", "Step that refused it (load, image, template, generate, length, features, ...)."),
    ("reason", "string", "Human-readable reason."),
)
