"""Conversations: record formats → messages, rendering, and response-only token labels.

Formats, all normalised to ``[{"role": system|user|assistant, "content": str}, ...]``:
  alpaca    ``instruction``, optional ``input`` (appended after a blank line), ``output``;
  sharegpt  ``conversations: [{"from": human|gpt|system, "value"}]`` (user/assistant also accepted);
  messages  ``messages: [{"role": system|user|assistant, "content"}]``.

Rendering: the tokenizer's chat template (``apply_chat_template(..., tokenize=False)``) if it has
one, else the plain template ``{bos}`` + per message ``<|role|>\\n{content}`` + (``{eos}`` after an
assistant turn, ``\\n`` after others); generation prompt ``<|assistant|>\\n``. Text is tokenised
with ``add_special_tokens=False``: the rendering already holds BOS/EOS. :class:`Encoder` does both
by shortcuts that give the same text and ids (checked as it goes), in batches.

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

import numpy as np

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


def _inherits(tokenizer: Any, methods: tuple[str, ...]) -> bool:
    """Whether ``tokenizer`` is a fast tokenizer that keeps the base class's ``methods``: only
    then do the shortcuts below do what those methods do (a subclass may rewrite text or ids)."""
    from transformers import PreTrainedTokenizerFast

    return isinstance(tokenizer, PreTrainedTokenizerFast) and all(
        getattr(type(tokenizer), m, None) is getattr(PreTrainedTokenizerFast, m, None)
        for m in methods)


class Encoder:
    """Renders and tokenises conversations for one tokenizer, by shortcuts checked against the
    reference calls.

    At millions of records the per-call overhead of ``apply_chat_template`` and
    ``tokenizer(...)`` costs more than the work itself, so the compiled chat template is rendered
    directly and text is encoded by a copy of the Rust backend (no truncation or padding, the
    tokenizer's ``split_special_tokens``). A prefix (prompt or turn) is not tokenised whole: a
    tokenizer cuts text at special tokens before anything else, so up to its last special token
    (an *anchor*) a prefix has the whole rendering's tokens, and only the rest is tokenised.
    :meth:`check` compares every shortcut with :func:`render` and ``tokenizer(text,
    add_special_tokens=False)`` on the first example of every batch and drops a shortcut for good
    at the first difference, so shortcuts change speed, never tokens. ``fallbacks`` names the
    shortcuts dropped.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.fallbacks: list[str] = []
        self._template, self._variables, self._backend = None, {}, None
        self._anchors: list[tuple[str, int]] | None = None  # None: not chosen yet; []: none
        self._tails: dict[str, list[int]] = {}  # tokens of short texts after the last anchor
        if getattr(tokenizer, "chat_template", None) and _inherits(
                tokenizer, ("apply_chat_template", "get_chat_template")):
            try:  # a private helper of transformers: any failure just means "no shortcut"
                from transformers.utils.chat_template_utils import _compile_jinja_template

                self._template = _compile_jinja_template(tokenizer.get_chat_template())
                self._variables = dict(tokenizer.special_tokens_map)
            except Exception:
                self.fallbacks.append("chat template")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if (backend is not None and hasattr(backend, "encode_batch_fast")
                and _inherits(tokenizer, ("__call__", "_encode_plus"))):
            self._backend = type(backend).from_str(backend.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()
            self._backend.encode_special_tokens = bool(
                getattr(tokenizer, "split_special_tokens", False))
        else:
            self._anchors = []

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        if self._template is None:
            return render(self.tokenizer, messages, generation_prompt)
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=generation_prompt, **self._variables)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._backend is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]

    def _choose_anchors(self, text: str) -> None:
        """Anchors: special tokens of ``text`` matched as themselves (not normalised, no
        stripping, not single-word) that no other added token overlaps, so that counting them
        in text counts their ids."""
        added = self._backend.get_added_tokens_decoder()
        self._anchors = [] if self._backend.encode_special_tokens else [
            (a.content, i) for i, a in added.items()
            if a.special and a.content in text and not (
                a.normalized or a.lstrip or a.rstrip or a.single_word)
            and not any(_overlaps(a.content, b.content) for j, b in added.items() if j != i)]

    def _split(self, text: str) -> tuple[int, int, int]:
        """(end of the last anchor in text, its occurrences in text, its id); (0, 0, -1) if
        there is none. The occurrence count says which of its ids in the whole ends the cut."""
        end, last, count = 0, -1, 0
        for content, i in self._anchors:
            at = text.rfind(content)
            if at >= 0 and at + len(content) > end:
                end, last, count = at + len(content), i, text.count(content)
        return end, count, last

    def encode_examples(self, examples: list[list[str]]) -> list[list[list[int]]]:
        """Token ids of each example's texts ``[whole, prefix, ...]`` (prefixes of ``whole``),
        as :meth:`encode` gives them one by one."""
        flat: list[str] = []
        plans = []  # per text: None (the whole again) or (anchor end, count, anchor id, tail)
        for texts in examples:
            plan: list = []
            for j, text in enumerate(texts):
                if j and text == texts[0]:  # the last turn prefix is often the whole
                    plan.append(None)
                    continue
                end, count, last = self._split(text) if j and self._anchors else (0, 0, -1)
                tail = text[end:]
                if not (end and tail in self._tails):  # else the template's known tail
                    flat.append(tail)
                plan.append((end, count, last, tail))
            plans.append(plan)
        flat = list(dict.fromkeys(flat))  # equal texts have equal tokens
        ids = dict(zip(flat, self.encode(flat)))
        out = []
        for texts, plan in zip(examples, plans):
            tokens: list[list[int]] = []
            for text, step in zip(texts, plan):
                if step is None:
                    tokens.append(tokens[0])
                    continue
                end, count, last, tail = step
                if not end:
                    tokens.append(ids[tail])
                    continue
                if tail in self._tails:
                    tail_ids = self._tails[tail]
                else:
                    tail_ids = ids[tail]
                    if len(tail) <= _TAIL_CHARS and len(self._tails) < _MAX_TAILS:
                        self._tails[tail] = tail_ids
                cut = _nth_index(tokens[0], last, count) + 1
                # 0: fewer anchor ids than anchors in the text; then tokenise this prefix whole
                tokens.append(tokens[0][:cut] + tail_ids if cut else self.encode([text])[0])
            out.append(tokens)
        return out

    def check(self, messages: list[dict[str, str]], loc: str) -> None:
        """Compare the shortcuts with the reference calls on one example with an assistant turn."""
        reference = _render_example(lambda m, g: render(self.tokenizer, m, g), messages, loc)
        if self._template is not None:
            try:
                same = _render_example(self.render, messages, loc) == reference
            except DataError:  # the reference rendered this record, so the shortcut is at fault
                same = False
            if not same:
                self._template = None
                self.fallbacks.append("chat template")
        if self._backend is None:
            return
        want = self.tokenizer(reference, add_special_tokens=False)["input_ids"]
        if self.encode(reference[:1]) != want[:1]:
            self._backend, self._anchors = None, []
            self.fallbacks.append("backend tokenizer")
            return
        if self._anchors is None:
            self._choose_anchors(reference[0])
        if self._anchors and self.encode_examples([reference])[0] != want:
            self._anchors = []
            self.fallbacks.append("prefix anchors")


# Tails (text after a prefix's last anchor) are mostly the template's own text, "assistant\\n":
# the tokens of the first few hundred short ones are kept instead of encoded again.
_TAIL_CHARS, _MAX_TAILS = 32, 256


def _nth_index(seq: list[int], value: int, n: int) -> int:
    """Index of the n-th (from 1) occurrence of ``value`` in ``seq``, or -1."""
    at = -1
    try:
        for _ in range(n):
            at = seq.index(value, at + 1)
    except ValueError:
        return -1
    return at


def _overlaps(a: str, b: str) -> bool:
    """Whether added tokens ``a`` and ``b`` can match overlapping text."""
    return a in b or b in a or any(a.endswith(b[:k]) or b.endswith(a[:k])
                                   for k in range(1, min(len(a), len(b))))


def _render_example(render_fn: Any, messages: list[dict[str, str]], loc: str) -> list[str]:
    """[whole, prompt_1, turn_1, prompt_2, turn_2, ...] for the example's assistant turns; [] if
    it has none (nothing to supervise: the example will be dropped). ``render_fn(messages,
    generation_prompt)`` renders."""
    if not any(m["role"] == "assistant" for m in messages):
        return []
    try:
        texts = [render_fn(messages, False)]
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                texts.append(render_fn(messages[:i], True))
                # the turn prefix of a final message is the whole conversation: no second render
                texts.append(texts[0] if i == len(messages) - 1 else render_fn(messages[: i + 1],
                                                                             False))
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


def tokenise_examples(encoder: Encoder, messages: list[list[dict[str, str]]], locs: list[str],
                      max_length: int) -> dict[str, Any]:
    """Tokenise a batch of examples; drop those without a supervised target after truncation.

    Returns flat int32 arrays ``input_ids`` and ``labels`` (kept examples back to back),
    ``lengths`` and ``n_target`` per kept example, and the counts ``records``, ``dropped`` and
    ``inexact`` (response boundaries inside a token).
    """
    first = next((i for i, m in enumerate(messages)
                  if any(t["role"] == "assistant" for t in m)), None)
    if first is not None:
        encoder.check(messages[first], locs[first])
    rendered = [_render_example(encoder.render, m, loc) for m, loc in zip(messages, locs)]
    encoded = encoder.encode_examples(rendered)
    all_ids: list[int] = []
    all_labels: list[int] = []
    lengths, n_targets, inexact = [], [], 0
    for tokens in encoded:
        if not tokens:
            continue
        whole, prefixes = tokens[0], tokens[1:]
        labels = [IGNORE_INDEX] * len(whole)
        for prompt, turn in zip(prefixes[0::2], prefixes[1::2]):
            start, exact_start = _common_prefix(whole, prompt)
            end, exact_end = _common_prefix(whole, turn)
            inexact += (not exact_start) + (not exact_end)
            labels[start:end] = whole[start:end]
        whole, targets = whole[:max_length], labels[1:max_length]
        n_target = len(targets) - targets.count(IGNORE_INDEX)  # after the causal shift
        if n_target > 0:
            all_ids += whole
            all_labels += labels[:max_length]
            lengths.append(len(whole))
            n_targets.append(n_target)
    return {"input_ids": np.array(all_ids, np.int32), "labels": np.array(all_labels, np.int32),
            "lengths": np.array(lengths, np.int64), "n_target": np.array(n_targets, np.int32),
            "records": len(messages), "dropped": len(messages) - len(lengths), "inexact": inexact}
