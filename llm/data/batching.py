"""Per-step training/validation batches: a pure function of (seed, step), identical on every rank.

Each step draws a *global* batch of pooled indices with a ``torch.Generator`` seeded from
(seed, step, stream), the same on every rank, so global per-source counts c_k and the global number
of supervised validation targets N_tok are known everywhere without communication, and resuming
needs only the step number.

Training draws (i.i.d., with replacement):
  stratified  a fixed quota ``per_source`` from every source (c_k = per_source for all k). This
              removes the absent-source bias of uniform batches (docs/method.md, pitfall 2); the
              global batch is then shuffled so that micro-batches mix sources.
  uniform     ``global_batch`` examples from the pooled data (as published). A source
              absent from the batch has c_k = 0 and contributes 0 to the training objective, with
              no renormalisation of π over the present sources (docs/method.md, pitfall 2).
Validation: ``val_batch`` examples i.i.d. with replacement from the concatenated validation set.

Split (the batch vocabulary): a step's *global* training batch B (``per_source`` × K, or
``global_batch``) is cut into C = B / ``micro_batch_size`` micro-batches of exactly
``micro_batch_size`` sequences (the sequences one rank forwards at once); rank r of W gets chunks
r, r + W, r + 2W, ..., i.e. A = C / W accumulation steps, so B = micro_batch_size × A × W. The
validation batch is cut into the same C chunks (the loop pairs the j-th training and validation
micro-batches), of ``val_batch`` / C sequences each. Every division must be exact (a clear error
otherwise: :func:`batch_shape`); ``micro_batch_size=None`` means A = 1 (a rank's whole share in one
forward). The older ``micro_batches=M`` (M micro-batches *per rank*, C = M × W, chunk sizes
allowed to differ by one, ``torch.tensor_split``) is still accepted. Only the rows of this rank's
chunks are read from the Arrow files.

Each micro-batch is a dict of right-padded int64 tensors: ``input_ids`` [b, T] (``pad_token_id``
after the end), ``attention_mask`` [b, T] (1 on tokens), ``labels`` [b, T] (-100 on pads) and
``source_ids`` [b] (training: index into ``data.names``; validation: into ``data.val_names``).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch
from torch import Tensor

from scalebio.llm.data.sources import IGNORE_INDEX, SourceData

MODES = ("stratified", "uniform")


class StepBatch(NamedTuple):
    """This rank's micro-batches for one step, plus the step's global normalisers."""

    train: list[dict[str, Tensor]]
    val: list[dict[str, Tensor]]
    counts: Tensor  # [K] int64, per-source counts in the *global* training batch
    val_tokens: int  # supervised validation targets (after the causal shift) in the global batch


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, step, stream): independent streams per step."""
    digest = hashlib.sha256(f"scalebio-batch:{seed}:{step}:{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: a positive integer is required, got {value!r}")
    return value


class BatchShape(NamedTuple):
    """How one step's batches split over ranks and micro-batches (counts are sequences)."""

    train_batch: int  # B: global training sequences per step
    val_batch: int  # global validation sequences per step
    world_size: int  # W: ranks
    accumulation: int  # A: micro-batches per rank per step (training and validation alike)
    micro_batch_size: int  # training sequences per forward on one rank (the largest chunk)
    val_micro_batch_size: int  # validation sequences per forward on one rank (the largest chunk)
    exact: bool  # every chunk has exactly these sizes (False only with the older micro_batches)

    @property
    def chunks(self) -> int:
        """C = A × W micro-batches per step over all ranks."""
        return self.accumulation * self.world_size


_LABELS = {"train": "training batch", "val": "val_batch", "mbs": "micro_batch_size",
           "micro": "micro_batches", "world": "world_size"}


def batch_shape(train_batch: int, val_batch: int, world_size: int = 1,
                micro_batch_size: int | None = None, micro_batches: int | None = None,
                labels: dict[str, str] | None = None) -> BatchShape:
    """Check and compute the split of the module docstring: B = micro_batch_size × A × W.

    ``labels`` names the quantities in messages (keys ``train``, ``val``, ``mbs``, ``micro``,
    ``world``; e.g. ``{"mbs": "data.micro_batch_size"}``). Raises ``ValueError`` naming them, with
    the arithmetic, when a division is not exact or a count is not a positive integer.
    """
    lab = {**_LABELS, **(labels or {})}
    for key, value in (("train", train_batch), ("val", val_batch), ("world", world_size)):
        _positive_int(lab[key], value)
    if micro_batch_size is not None and micro_batches is not None:
        raise ValueError(f"{lab['mbs']} and {lab['micro']}: give one (micro_batches is the older "
                         "per-rank count of micro-batches)")
    if micro_batches is not None:  # the older vocabulary: M per rank, C = M × W near-equal chunks
        m = _positive_int(lab["micro"], micro_batches)
        chunks = m * world_size
        for key, size in (("train", train_batch), ("val", val_batch)):
            if size < chunks:
                raise ValueError(f"{lab[key]}: {size} examples cannot fill {lab['micro']} × "
                                 f"{lab['world']} = {m} × {world_size} = {chunks} micro-batches")
        exact = train_batch % chunks == 0 and val_batch % chunks == 0
        return BatchShape(train_batch, val_batch, world_size, m, -(-train_batch // chunks),
                          -(-val_batch // chunks), exact)
    if micro_batch_size is None:  # one micro-batch per rank
        if train_batch % world_size:
            raise ValueError(
                f"{lab['train']}: {train_batch} sequences do not split evenly over {lab['world']} "
                f"{world_size} ranks; make it a multiple of {world_size} or set {lab['mbs']}")
        micro_batch_size = train_batch // world_size
    mbs = _positive_int(lab["mbs"], micro_batch_size)
    if train_batch % mbs:
        raise ValueError(f"{lab['mbs']}: {mbs} does not divide the {lab['train']} of "
                         f"{train_batch} sequences (batch = {lab['mbs']} × accumulation × "
                         f"{lab['world']})")
    chunks = train_batch // mbs
    if chunks % world_size:
        raise ValueError(
            f"{lab['world']} {world_size}: the {lab['train']} of {train_batch} = {chunks} "
            f"micro-batches of {lab['mbs']} {mbs} cannot be shared evenly by {world_size} ranks "
            f"(batch = {lab['mbs']} × accumulation × {lab['world']} needs {chunks} / "
            f"{world_size} to be a whole number of accumulation steps)")
    if val_batch % chunks:
        raise ValueError(
            f"{lab['val']}: {val_batch} is not a multiple of the step's {chunks} micro-batches "
            f"({lab['train']} {train_batch} / {lab['mbs']} {mbs}): every training micro-batch "
            f"is paired with one validation micro-batch, so {lab['val']} / {chunks} sequences "
            f"must be whole (e.g. {lab['val']} {max(chunks, val_batch // chunks * chunks)})")
    return BatchShape(train_batch, val_batch, world_size, chunks // world_size, mbs,
                      val_batch // chunks, True)


def collate(rows: dict[str, list], source_ids: Tensor, pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad rows (``input_ids``/``labels`` lists) into the micro-batch dict."""
    lengths = [len(x) for x in rows["input_ids"]]
    b, t = len(lengths), max(lengths)
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    for i, (ids, lab, n) in enumerate(zip(rows["input_ids"], rows["labels"], lengths)):
        input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(lab, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "source_ids": source_ids.to(torch.long)}


class StepSampler:
    """Draws :class:`StepBatch` for any step; see the module docstring for the exact scheme.

    The split: ``micro_batch_size`` sequences per forward on each rank (``None``: one micro-batch
    per rank), or the older ``micro_batches`` per rank; :attr:`shape` is the resulting
    :class:`BatchShape` and :attr:`micro_batches` its accumulation steps per rank.
    """

    def __init__(self, data: SourceData, mode: str, *, val_batch: int, seed: int,
                 pad_token_id: int, per_source: int | None = None,
                 global_batch: int | None = None, rank: int = 0, world_size: int = 1,
                 micro_batch_size: int | None = None, micro_batches: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if mode == "stratified":
            if global_batch is not None:
                raise ValueError("global_batch: only for mode='uniform' (stratified: per_source)")
            per_source = _positive_int("per_source", per_source)
            train_batch = per_source * len(data.names)
        else:
            if per_source is not None:
                raise ValueError("per_source: only for mode='stratified' (uniform: global_batch)")
            train_batch = _positive_int("global_batch", global_batch)
        self.world_size = _positive_int("world_size", world_size)
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: must lie in [0, {world_size}), got {rank!r}")
        if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or pad_token_id < 0:
            raise ValueError(f"pad_token_id: a token id (int >= 0) is needed, got {pad_token_id!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed: an integer is required, got {seed!r}")
        self.val_batch = _positive_int("val_batch", val_batch)
        self.shape = batch_shape(train_batch, self.val_batch, self.world_size, micro_batch_size,
                                 micro_batches)
        self.micro_batches = self.shape.accumulation  # per rank, as the older argument meant
        self.data, self.mode, self.rank, self.seed = data, mode, rank, seed
        self.per_source, self.train_batch, self.pad_token_id = per_source, train_batch, pad_token_id
        sizes = torch.tensor([len(d) for d in data.train], dtype=torch.long)
        if bool((sizes == 0).any()) or len(data.val) == 0:
            raise ValueError("data: every training source and the validation set need examples")
        self.sizes = sizes
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        self.val_n_target = torch.tensor(data.val["n_target"], dtype=torch.long)
        self.val_source = torch.tensor(data.val["source"], dtype=torch.long)

    def draw(self, step: int, inner: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """The global draw of ``step``: (train source ids, train local indices, val indices).

        ``inner`` i ≥ 1 draws the training batch of u's i-th extra step from its own stream
        (a pure function of (seed, step, i), so a resumed run redraws it)."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step: a non-negative integer is required, got {step!r}")
        g = step_generator(self.seed, step, "train" if inner == 0 else f"train-u{inner}")
        k = len(self.sizes)
        if self.mode == "stratified":
            local = torch.cat([torch.randint(int(n), (self.per_source,), generator=g)
                               for n in self.sizes])
            sources = torch.arange(k).repeat_interleave(self.per_source)
            perm = torch.randperm(self.train_batch, generator=g)
            sources, local = sources[perm], local[perm]
        else:
            pooled = torch.randint(int(self.offsets[-1]), (self.train_batch,), generator=g)
            sources = torch.searchsorted(self.offsets, pooled, right=True) - 1
            local = pooled - self.offsets[sources]
        val = torch.randint(len(self.val_n_target), (self.val_batch,),
                            generator=step_generator(self.seed, step, "val"))
        return sources, local, val

    def _mine(self, t: Tensor) -> list[Tensor]:
        chunks = torch.tensor_split(t, self.shape.chunks)
        return list(chunks[self.rank :: self.world_size])

    def batch(self, step: int, inner: int = 0) -> StepBatch:
        """This rank's micro-batches of ``step`` and the step's global counts (no communication);
        ``inner`` as in :meth:`draw`."""
        sources, local, val = self.draw(step, inner)
        counts = torch.bincount(sources, minlength=len(self.sizes))
        val_tokens = int(self.val_n_target[val].sum())
        train = []
        for src, idx in zip(self._mine(sources), self._mine(local)):
            rows: dict[str, list] = {"input_ids": [], "labels": []}
            for s, i in zip(src.tolist(), idx.tolist()):  # rows come from several Arrow files
                row = self.data.train[s][i]
                rows["input_ids"].append(row["input_ids"])
                rows["labels"].append(row["labels"])
            train.append(collate(rows, src, self.pad_token_id))
        val_micro = [collate(self.data.val[idx.tolist()], self.val_source[idx], self.pad_token_id)
                     for idx in self._mine(val)]
        return StepBatch(train=train, val=val_micro, counts=counts, val_tokens=val_tokens)
