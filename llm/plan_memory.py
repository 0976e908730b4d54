"""Per-rank bytes of a ScaleBiO run, predicted from shapes alone (``scalebio plan``).

Two phases bound the peak; the larger wins: **backward** (resident state + the gradients both
copies accumulate + the activation peak of one forward/backward piece + the engine's transient
all-gathered weights) and **step** (resident state + the engines' optimizer-step buffers). The
resident state is the bf16/fp32 weights of both copies, fp32 masters and AdamW moments of the
trainable parameters (only those: ``LisaOptimizer`` and DeepSpeed keep no state for frozen ones)
and DeepSpeed's fixed buffers. Gradients of bf16 weights are summed in fp32 when
``engine.fp32_grad_accum`` is on (the default): 4 B per trainable parameter.

Activations (llm/loop/step.py): the step runs one backward per forward (f(w) on validation, H(w)
and H(u) on training), so one forward's saved tensors are alive at a time. Per token and decoder
layer, PyTorch saves only what a gradient needs: with the block frozen but its input requiring a
gradient (it does when anything below trains), the fp32 copies of both RMSNorm inputs (8h bytes),
q, k, v and the attention output plus its log-sum-exp, and the gate, SiLU and up outputs of the
MLP; a trained block also saves the inputs of its linear layers and the normalised activations.
LISA's worst case is taken: every layer's input requires a gradient. The loss keeps the fp32
log-softmax of the supervised positions (4 B per token and vocabulary entry) and its backward
holds three such tensors at once (12 B). A padded micro-batch (more than one sequence) adds the
additive attention mask per layer and k/v repeated to every head (SDPA's GQA path needs no mask).
Under DeepSpeed ZeRO-3 every linear layer also saves its input (DeepSpeed's own linear function).

Checked against the allocator's measured peak of real runs on CPU (single, FSDP2 and ZeRO-3 on 2
ranks, fp32 and bf16; tests/llm/test_plan.py): within 7 %, most within 0.5 %.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scalebio.llm.plan_arch import Arch, Inventory, _numel

GiB = 2**30
ZERO_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements), allocated eagerly
ZERO3_PERSIST = 100_000  # stage3_param_persistence_threshold: smaller params also stay whole
# stage3_max_live_parameters: ZeRO-3 keeps a parameter gathered between its forward and its
# backward while it is reused within this many elements (stage3_max_reuse_distance, same value),
# so up to this many elements of one copy are whole at once (a whole copy of a small model)
ZERO3_MAX_LIVE = 1_000_000_000


@dataclass(frozen=True)
class Placement:
    """Where the engine puts things: ``kind`` single | ddp | fsdp2 | deepspeed."""

    kind: str
    world: int = 1
    zero_stage: int = 2
    offload: bool = False
    weight_bytes: int = 2  # bf16 weights (4: fp32)
    adam: bool = True  # AdamW (8 B of moments per trainable parameter); False: plain SGD
    cuda: bool = True  # GPU: foreach AdamW temporaries (CPU steps tensor by tensor)
    comm_bytes: int = 4  # DeepSpeed's communication dtype (bf16 with engine.bf16, else fp32)
    fp32_grads: bool = True  # torch engines accumulate bf16 weights' gradients in fp32
    checkpointing: bool = False  # model.gradient_checkpointing: blocks recomputed in backward


@dataclass(frozen=True)
class MicroBatch:
    batch: int  # sequences per forward on one rank
    seq: int  # tokens per sequence (data.max_length: the worst case)
    pad: bool | None = None  # an attention mask; None: whenever batch > 1 (the worst case)
    supervised: int | None = None  # supervised targets per sequence; None: seq - 1 (worst case)

    @property
    def padded(self) -> bool:
        return self.batch > 1 if self.pad is None else self.pad

    @property
    def targets(self) -> int:
        return self.batch * (self.seq - 1 if self.supervised is None else self.supervised)


@dataclass
class Row:
    name: str
    bytes: int
    phase: str  # resident | backward | step
    note: str = ""


@dataclass
class Prediction:
    rows: list[Row] = field(default_factory=list)

    def total(self, phase: str) -> int:
        return sum(r.bytes for r in self.rows if r.phase == phase)

    @property
    def peak(self) -> int:
        return self.total("resident") + max(self.total("backward"), self.total("step"))

    @property
    def peak_phase(self) -> str:
        return "backward" if self.total("backward") >= self.total("step") else "step"

    def get(self, name: str) -> int:
        return sum(r.bytes for r in self.rows if r.name == name)


# ---------------------------------------------------------------- activations
def layer_saved(arch: Arch, mb: MicroBatch, s: int, trained: bool,
                linear_inputs: bool = False) -> int:
    """Bytes one decoder layer saves for backward (its input requires a gradient).

    ``linear_inputs``: every linear layer saves its input even with a frozen weight (DeepSpeed
    ZeRO-3 replaces ``torch.nn.functional.linear`` by its own autograd function, which does).
    """
    h, i, n = arch.hidden, arch.intermediate, mb.batch * mb.seq
    q = arch.heads * arch.head_dim
    kv = q if mb.padded and arch.kv_heads != arch.heads else arch.kv_heads * arch.head_dim
    per_token = (
        2 * (4 * h + 4)  # fp32 RMSNorm inputs (the input itself in fp32) and 1/rms, two norms
        + s * (2 * q + 2 * kv)  # q, k, v after RoPE and the attention output (= o_proj's input)
        + 4 * arch.heads  # the attention's log-sum-exp
        + 3 * s * i  # gate, SiLU(gate), up
    )
    if trained or linear_inputs:  # the linear layers' inputs (q/k/v, gate/up, down)
        per_token += s * (2 * h + i)
    if trained:  # the normalised activations, for the RMSNorm weights' gradients
        per_token += s * 2 * h
    mask = mb.batch * mb.seq * mb.seq * s if mb.padded else 0  # additive mask, one per layer
    return n * per_token + mask


def activations(arch: Arch, inv: Inventory, mb: MicroBatch, s: int,
                checkpointing: bool = False, linear_inputs: bool = False) -> dict[str, int]:
    """Activation bytes of one forward/backward piece: the saved tensors, and the extra bytes at
    the three moments that can be the peak: the loss's forward (``fwd``), the loss's backward
    (``bwd_loss``) and the top block's backward (``bwd_layer``)."""
    n_tok = mb.batch * mb.seq
    sup = mb.targets  # supervised positions after the causal shift
    h, v = arch.hidden, arch.vocab
    mlp_grads = n_tok * s * (4 * arch.intermediate + 2 * h)  # gradients inside one MLP backward
    top_block = mlp_grads
    if checkpointing:  # each layer keeps its input; one layer is recomputed in its backward
        layers = arch.layers * n_tok * s * h
        # non-reentrant recomputation frees each recomputed tensor once backward has used it, so
        # the MLP's own tensors (gate, SiLU(gate), up, down's input) give way to its gradients
        mlp_saved = n_tok * s * 4 * arch.intermediate
        recomputed = layer_saved(arch, mb, s, True)  # the worst case: a trained block
        top_block = recomputed - mlp_saved + max(mlp_saved, mlp_grads)
    else:
        # every block on the backward path: exact with trained embeddings; with them frozen the
        # blocks below the lowest drawn one save nothing, and this is the worst case (block 0)
        frozen = layer_saved(arch, mb, s, False, linear_inputs)
        trained = layer_saved(arch, mb, s, True, linear_inputs)
        layers = arch.layers * frozen + inv.n_active * (trained - frozen)
    head_input = inv.head_trained or linear_inputs
    final = n_tok * (4 * h + 4 + s * h + (s * h if head_input else 0))
    rope = 2 * n_tok * arch.head_dim * s + 8 * n_tok  # cos, sin; the token ids
    mask = mb.batch * mb.seq * mb.seq if mb.padded else 0  # the boolean 4-D mask, shared
    # forward: logits [b, T, V] + the supervised rows upcast to fp32 + their log-softmax
    fwd = n_tok * v * s + 8 * sup * v
    if mb.padded and arch.kv_heads != arch.heads:  # the KV cache keeps the un-repeated k, v
        fwd += arch.layers * n_tok * 2 * arch.kv_heads * arch.head_dim * s
    return {"saved": layers + final + rope + mask, "fwd": fwd,
            "bwd_loss": 12 * sup * v,  # log-softmax output, its gradient, the input's gradient
            # the logits' gradient and the head weight's (before it joins the accumulated one)
            "bwd_head": n_tok * v * s + (v * h * s if inv.head_trained else 0),
            "bwd_layer": top_block}


# ---------------------------------------------------------------- parameters
def _shard(shape, world: int) -> int:
    """FSDP2 shards dim 0, padded to a multiple of the world size."""
    rest = _numel(shape[1:]) if len(shape) > 1 else 1
    return -(-int(shape[0]) // world) * rest if len(shape) else 1


def _part(shape, world: int) -> int:
    """ZeRO partitions the flattened tensor, padded to a multiple of the world size."""
    return -(-_numel(shape) // world)


def predict(arch: Arch, inv: Inventory, pl: Placement, train: MicroBatch, val: MicroBatch,
            k_sources: int) -> Prediction:
    """The rows of one rank (both copies u and w; module docstring)."""
    s, w = pl.weight_bytes, pl.world
    master = 0 if s >= 4 else 4  # fp32 (and fp64) weights are their own masters
    dtype = {2: "bf16", 4: "fp32", 8: "fp64"}
    mom = 8 if pl.adam else 0
    pred = Prediction()
    add = pred.rows.append
    shapes, trainable = inv.all_shapes, inv.trainable_shapes()
    a = inv.trainable
    zero = pl.kind == "deepspeed"
    if pl.kind == "fsdp2":
        per = lambda shp: sum(_shard(x, w) for x in shp)  # noqa: E731
    elif zero:
        per = lambda shp: sum(_part(x, w) for x in shp)  # noqa: E731
    else:
        per = lambda shp: sum(_numel(x) for x in shp)  # noqa: E731
    a_local = per(trainable)

    # resident: weights of both copies, masters and moments of the trainable parameters
    if pl.kind == "fsdp2" or (zero and pl.zero_stage == 3):
        if zero:  # every parameter is partitioned; those under the threshold also stay whole
            weights = sum(_part(x, w) + (_numel(x) if _numel(x) <= ZERO3_PERSIST else 0)
                          for x in shapes)
        else:
            weights = per(shapes)
        note = f"sharded over {w} ranks"
    else:
        weights, note = sum(_numel(x) for x in shapes), "replicated"
    add(Row("weights (u + w)", 2 * s * weights, "resident",
            f"{2 * inv.total / 1e9:.3g} B params, {dtype[s]}, {note}"))
    zmaster = 4 if zero else master  # ZeRO keeps an fp32 partition even of fp32 weights
    on_host = zero and pl.offload
    add(Row("fp32 masters (u + w)", 0 if on_host else 2 * zmaster * a_local, "resident",
            f"{2 * a / 1e9:.3g} B trainable" + (", on the host (offload)" if on_host else "")))
    add(Row("Adam moments (u + w)", 0 if on_host else 2 * mom * a_local, "resident",
            "8 B per trainable parameter" if mom else "SGD: none"))
    if zero:
        groups = [per(inv.persistent), per(trainable) - per(inv.persistent)]
        fixed = ZERO_BUCKET * pl.comm_bytes  # reduce bucket, allocated at initialize
        # partitioned gradients, summed in fp32 with engine.fp32_grad_accum (else comm dtype);
        # with the optimizer offloaded they live on the host
        fixed += 0 if on_host else (4 if pl.fp32_grads else pl.comm_bytes) * a_local
        add(Row("DeepSpeed buffers (u + w)", 2 * fixed, "resident",
                f"reduce bucket of {ZERO_BUCKET:.0e} elements, gradient partitions"))
    add(Row("λ and its AdamW state", 3 * 4 * k_sources, "resident", f"{k_sources} sources"))

    # backward: accumulated gradients, one piece's activations, engine transients
    gb = 4 if s == 2 and pl.fp32_grads else s  # bytes per gradient element (torch engines)
    if not zero:
        add(Row("gradients (u + w)", 2 * gb * a_local, "backward",
                f"{dtype[gb]}, accumulated over the micro-batches"
                + (", sharded" if pl.kind == "fsdp2" else "")))
    # one piece's peak: the largest of four moments, each with the engine's gathered weights
    sharded = pl.kind == "fsdp2" or (zero and pl.zero_stage == 3)
    root = late = 0  # whole weights during a piece; more in the blocks' backward
    if pl.kind == "fsdp2":  # the root unit stays whole from forward to the end of backward
        root = s * sum(_numel(x) for x in inv.root_shapes)
        late = 4 * s * inv.block_numel  # two whole blocks, an active one's gradient, its copy
        late += s * arch.vocab * arch.hidden if inv.head_trained else 0  # waits for the root
    elif sharded:  # ZeRO-3: partitioned parameters stay gathered while reused (ZERO3_MAX_LIVE)
        root = s * min(ZERO3_MAX_LIVE, sum(_numel(x) for x in shapes if _numel(x) > ZERO3_PERSIST))
        late = s * inv.block_numel  # a block's gradient before it enters the reduce bucket
    best = (-1, 0, 0, "")
    for mb, what in ((train, "training"), (val, "validation")):
        x = activations(arch, inv, mb, s, checkpointing=pl.checkpointing,
                        linear_inputs=zero and pl.zero_stage == 3)
        for extra, gathered, moment in ((x["fwd"], root, "loss forward"),
                                        (x["bwd_loss"], root, "loss backward"),
                                        (x["bwd_head"], root, "head backward"),
                                        (x["bwd_layer"], root + late, "top block backward")):
            total = x["saved"] + extra + gathered
            if total > best[0]:
                best = (total, x["saved"] + extra, gathered,
                        f"{what} micro-batch {mb.batch} × {mb.seq} tokens, at the {moment}")
    add(Row("activations", best[1], "backward", best[3]))
    if sharded:
        what = ("the root unit (embeddings, norm, head)" if pl.kind == "fsdp2" else
                f"up to {ZERO3_MAX_LIVE:.0e} elements of a copy")
        add(Row("all-gathered weights + grads", best[2], "backward",
                what + (" whole, blocks and unreduced gradients" if best[2] > root else " whole")))

    # step: the copy that steps first (u) holds fp32 gradients, the other its low-precision ones
    if zero:
        add(Row("fp32 gradients of a group", 0 if on_host else 4 * max(groups), "step",
                "the largest parameter group's, while it steps"))
        add(Row("optimizer step temporaries", 4 * max(groups) if pl.cuda and not on_host else 0,
                "step", "foreach AdamW: sqrt of the moments" if pl.cuda else "one at a time"))
    elif gb >= 4:  # already fp32 (on the masters, or the fp32 weights themselves)
        add(Row("gradients (u + w)", 2 * gb * a_local, "step", "until each copy steps"))
    else:  # u's move onto the fp32 masters while w's wait in their own dtype
        add(Row("gradients of w", s * a_local, "step", "waiting for w's step"))
        add(Row("fp32 gradients of u", 4 * a_local, "step", "moved onto the masters"))
    if not zero:
        if pl.kind == "ddp" and w > 1:
            add(Row("all-reduce buffer", 4 * a_local, "step", "one flat buffer per dtype"))
        big = max(per(inv.persistent), per(trainable) - per(inv.persistent))
        largest = max(_numel(x) for x in trainable)
        add(Row("optimizer step temporaries", 4 * (big if pl.cuda else largest), "step",
                "foreach AdamW: sqrt of the moments" if pl.cuda else "one tensor at a time"))
    return pred
