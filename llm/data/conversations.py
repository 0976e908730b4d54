"""Conversations: record formats → messages, rendering, and response-only token labels.

Formats, all normalised to ``[{"role": system|user|assistant, "content": str}, ...]``:
  alpaca    ``instruction``, optional ``input`` (appended after a blank line), ``output``;
  sharegpt  ``conversations: [{"from": human|gpt|system, "value"}]`` (user/assistant also accepted);
  messages  ``messages: [{"role": system|user|assistant, "content"}]``.

Rendering: the tokenizer's chat template (``apply_chat_template(..., tokenize=False)``) if it has
one, else the plain template ``{bos}`` + per message ``<|role|>\\n{content}`` + (``{eos}`` after an
assistant turn, ``\\n`` after others); generation prompt ``<|assistant|>\\n``. Text is tokenised
with ``add_special_tokens=False``: the rendering already holds BOS/EOS.

Response boundary: for the i-th assistant turn, render ``messages[:i]`` + generation prompt (prompt
prefix) and ``messages[:i+1]`` (turn prefix); both must be textual prefixes of the whole rendering
(else the template is not prefix-stable: DataError). Tokenise them and supervise the whole
rendering's tokens in ``[lcp(prompt), lcp(turn))``, lcp = length of the common prefix of a prefix's
tokens with the whole's. Exact whenever a prefix tokenises as the start of the whole (role tags
ending in special tokens or at a pre-tokeniser split). If a merge straddles a boundary, the first
differing token is supervised at a response start and not at an end; such boundaries are counted.

Labels are -100 outside responses; ``n_target`` counts supervised targets after the causal shift
(``labels[1:]``), as the loss does. Truncation keeps the first ``max_length`` tokens; an example
left with ``n_target == 0`` (or with no assistant turn) is dropped.
"""

from __future__ import annotations

from typing import Any

FORMATS = ("alpaca", "sharegpt", "messages")
IGNORE_INDEX = -100
PLAIN_TAGS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
_MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", **_MESSAGE_ROLES}


class DataError(ValueError):
    """Bad training or validation data; the message names the file and the line, record or field."""


def _text(obj: dict, key: str, loc: str, field: str) -> str:
    if key not in obj:
        raise DataError(f"{loc}: missing field {field!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{loc}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def to_messages(record: Any, fmt: str, loc: str) -> list[dict[str, str]]:
    """Normalise one record of format ``fmt`` to a messages list; ``loc`` names it in errors."""
    if not isinstance(record, dict):
        raise DataError(f"{loc}: a record must be an object, got {type(record).__name__}")
    if fmt == "alpaca":
        instruction = _text(record, "instruction", loc, "instruction")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{loc}: field 'input' must be a string, got {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        output = _text(record, "output", loc, "output")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if fmt == "sharegpt":
        key, role_key, text_key, roles = "conversations", "from", "value", _SHAREGPT_ROLES
    elif fmt == "messages":
        key, role_key, text_key, roles = "messages", "role", "content", _MESSAGE_ROLES
    else:
        raise DataError(f"{loc}: unknown format {fmt!r}; expected one of {FORMATS}")
    if key not in record:
        raise DataError(f"{loc}: missing field {key!r}")
    turns = record[key]
    if not isinstance(turns, list):
        raise DataError(f"{loc}: field {key!r} must be a list, got {type(turns).__name__}")
    messages = []
    for j, turn in enumerate(turns):
        field = f"{key}[{j}]"
        if not isinstance(turn, dict):
            raise DataError(f"{loc}: field {field!r} must be an object")
        role = turn.get(role_key)
        if role not in roles:
            raise DataError(
                f"{loc}: field '{field}.{role_key}' must be one of {sorted(roles)}, got {role!r}"
            )
        content = _text(turn, text_key, loc, f"{field}.{text_key}")
        messages.append({"role": roles[role], "content": content})
    return messages


# ---------------------------------------------------------------- rendering and labels


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """Render messages as text: the chat template if the tokenizer has one, else the plain one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    if tokenizer.eos_token is None:
        raise DataError("tokenizer: no eos_token; the plain template ends each response with it")
    parts = [tokenizer.bos_token or ""]
    for m in messages:
        end = tokenizer.eos_token if m["role"] == "assistant" else "\n"
        parts.append(PLAIN_TAGS[m["role"]] + m["content"] + end)
    if generation_prompt:
        parts.append(PLAIN_TAGS["assistant"])
    return "".join(parts)


def _common_prefix(a: list[int], b: list[int]) -> tuple[int, bool]:
    """Length of the common prefix of ``a`` (whole) and ``b`` (prefix), and whether it is all b."""
    if a[: len(b)] == b:
        return len(b), True
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n, False


def _render_example(tokenizer: Any, messages: list[dict[str, str]], loc: str) -> list[str]:
    """[whole, prompt_1, turn_1, prompt_2, turn_2, ...] for the example's assistant turns; [] if
    it has none (nothing to supervise: the example will be dropped)."""
    if not any(m["role"] == "assistant" for m in messages):
        return []
    try:
        texts = [render(tokenizer, messages, False)]
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                texts.append(render(tokenizer, messages[:i], True))
                texts.append(render(tokenizer, messages[: i + 1], False))
    except DataError:
        raise
    except Exception as e:  # jinja and template code raise many types; name the record
        raise DataError(f"{loc}: the chat template failed to render this record ({e})") from e
    for prompt, turn in zip(texts[1::2], texts[2::2]):
        if not (texts[0].startswith(turn) and turn.startswith(prompt)):
            raise DataError(
                f"{loc}: the chat template is not prefix-stable (rendering the first messages is "
                "not a prefix of the whole conversation), so response tokens cannot be located"
            )
    return texts


def tokenise_batch(batch: dict, tokenizer: Any, max_length: int, stats: dict) -> dict:
    """``Dataset.map`` function: ``{"messages", "loc"}`` columns → ``{"input_ids", "labels",
    "n_target"}`` rows, dropping examples without a supervised target; counts inexact boundaries
    into ``stats["inexact"]``."""
    rendered = [_render_example(tokenizer, m, loc)
                for m, loc in zip(batch["messages"], batch["loc"])]
    flat: list[str] = []
    slots = []  # slots[e][j]: index in flat of the j-th text of example e
    for texts in rendered:
        idx: list[int] = []
        for j, text in enumerate(texts):
            if j and text == texts[0]:  # the last turn prefix is often the whole: tokenise once
                idx.append(idx[0])
            else:
                idx.append(len(flat))
                flat.append(text)
        slots.append(idx)
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out: dict[str, list] = {"input_ids": [], "labels": [], "n_target": []}
    for idx in slots:
        if not idx:
            continue
        whole, prefixes = ids[idx[0]], [ids[i] for i in idx[1:]]
        labels = [IGNORE_INDEX] * len(whole)
        for prompt, turn in zip(prefixes[0::2], prefixes[1::2]):
            start, exact_start = _common_prefix(whole, prompt)
            end, exact_end = _common_prefix(whole, turn)
            stats["inexact"] += (not exact_start) + (not exact_end)
            labels[start:end] = whole[start:end]
        whole, labels = whole[:max_length], labels[:max_length]
        n_target = sum(1 for y in labels[1:] if y != IGNORE_INDEX)
        if n_target > 0:
            out["input_ids"].append(whole)
            out["labels"].append(labels)
            out["n_target"].append(n_target)
    return out
