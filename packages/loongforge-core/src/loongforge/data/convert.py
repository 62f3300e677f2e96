"""Conversation data formats: read, normalise to OpenAI ``messages``, convert between formats.

Formats (one JSON object per line in ``.jsonl``/``.json``, or one row per record in ``.parquet``):

* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
* ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}``
  (an optional top-level ``system`` is the system message)
* ``alpaca``: ``{"instruction": "...", "input": "...", "output": "...", "system": "...",
  "history": [["earlier instruction", "earlier answer"], ...]}`` (``input``, ``system`` and
  ``history`` optional; the user turn is ``instruction`` + a blank line + ``input``)

A ``.json`` file may also hold one JSON array of records (how Alpaca-style sets are usually
shipped). ``auto`` detects the format of each record from its keys. ``loongforge data convert IN
OUT --to FORMAT`` rewrites a file in another format (jsonl or parquet by OUT's suffix).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from loongforge.data.errors import DataError

FORMATS = ("messages", "sharegpt", "alpaca")
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant", "model": "assistant"}
_TO_SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise DataError(f"cannot tell the conversation format of a record with keys {sorted(record)} "
                    f"(expected 'messages', 'conversations' or 'instruction'/'output')")


def to_messages(record: dict, fmt: str = "auto") -> list[dict[str, str]]:
    """The record as a list of ``{"role", "content"}`` messages (validated)."""
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt == "messages":
        messages = [{"role": str(m["role"]), "content": str(m["content"] or "")} for m in record["messages"]]
    elif fmt == "sharegpt":
        messages = [{"role": "system", "content": str(record["system"])}] if record.get("system") else []
        for turn in record["conversations"]:
            role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise DataError(f"sharegpt turn with unknown 'from': {turn['from']!r}")
            messages.append({"role": role, "content": str(turn["value"] or "")})
    elif fmt == "alpaca":
        messages = [{"role": "system", "content": str(record["system"])}] if record.get("system") else []
        for turn in record.get("history") or []:
            if len(turn) != 2:
                raise DataError(f"alpaca 'history' entries are [instruction, answer] pairs, got {turn!r}")
            messages += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
        user = str(record["instruction"] or "")
        if record.get("input"):
            user = f"{user}\n\n{record['input']}"
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": str(record["output"] or "")}]
    else:
        raise DataError(f"unknown conversation format {fmt!r} (one of auto, {', '.join(FORMATS)})")
    bad = [m["role"] for m in messages if m["role"] not in ROLES]
    if bad:
        raise DataError(f"unknown message role(s) {bad} (expected {', '.join(ROLES)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("conversation has no assistant turn")
    return messages


def from_messages(messages: list[dict[str, str]], fmt: str) -> dict:
    """One record in ``fmt`` holding ``messages``."""
    if fmt == "messages":
        return {"messages": messages}
    if fmt == "sharegpt":
        return {"conversations": [{"from": _TO_SHAREGPT[m["role"]], "value": m["content"]} for m in messages]}
    if fmt == "alpaca":
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        roles = [m["role"] for m in turns]
        if not turns or roles != ["user", "assistant"] * (len(turns) // 2):
            raise DataError("alpaca holds alternating user/assistant turns (after at most one leading system "
                            f"message); this conversation has roles {[m['role'] for m in messages]}")
        pairs = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns), 2)]
        out = {"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1]}
        if system is not None:
            out["system"] = system
        if len(pairs) > 1:
            out["history"] = pairs[:-1]
        return out
    raise DataError(f"unknown conversation format {fmt!r} (one of {', '.join(FORMATS)})")


def iter_records(path: str | Path) -> Iterator[dict]:
    """JSON objects of a ``.jsonl``/``.json`` file or rows of a ``.parquet`` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        if head.startswith("["):  # one JSON array of records
            try:
                records = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
            for n, record in enumerate(records, 1):
                if not isinstance(record, dict):
                    raise DataError(f"{path}: item {n} of the array is not a JSON object")
                yield record
            return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc


def write_records(path: str | Path, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
        return
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def convert(src: str | Path, dst: str | Path, to: str, source_format: str = "auto") -> int:
    """Rewrite ``src`` as ``dst`` in format ``to``; returns the number of records written."""
    if to not in FORMATS:
        raise DataError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    out = []
    for n, record in enumerate(iter_records(src), 1):
        try:
            out.append(from_messages(to_messages(record, source_format), to))
        except (DataError, KeyError, TypeError) as exc:
            raise DataError(f"{src}: record {n}: {exc}") from exc
    write_records(dst, out)
    return len(out)
