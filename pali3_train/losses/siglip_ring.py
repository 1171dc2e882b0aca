"""SigLIP's sigmoid loss over the whole data-parallel batch, chunked and all-gather-free.

Rank r holds b images and b texts. It scores its images against the b texts it currently holds
(one b x b block of logits), then passes those texts to a neighbour by point-to-point exchange;
after n - 1 hops every image has met every text of the global batch, and no rank ever held more
than a block of logits or more than two chunks of foreign texts. The next chunk is in flight while
the current block is computed.

The gradients circulate the same way (the plain kernel sends the texts round again in its
backward, the fused one computes them in the forward's trip; see below): each travelling chunk
carries an accumulator of the gradient its texts received on the way, and a last hop returns
every accumulator to the rank that owns those texts.

Normalisation. Each rank returns l_r = (1/b) * sum over its images i and all texts j of
-log sigmoid(z_ij (t <x_i, y_j> + b)). The mean of l_r over ranks is the paper's loss over the
global batch, and so are the gradients once data parallelism averages them (DeepSpeed and DDP
do): the texts' owners receive the sum of every rank's contribution.

``bidirectional=True`` sends chunks both ways at once, so ceil((n - 1) / 2) steps instead of
n - 1.

Two kernels for the blocks (``kernels.ring_loss``, set on the model by ``pali3_train.kernels``):

- ``"plain"``, the reference: the forward scores each block (logits, labels, log-sigmoid), the
  backward recirculates the texts (nothing from the forward is kept but the inputs) and composes
  each block's gradients from PyTorch ops; autograd records neither, but a backward block holds
  6-13 b x b buffers at once.
- ``"fused"``: the loss is a scalar, so its gradients are ``grad_out`` times those of the loss
  itself. The forward computes both in one trip round the ring (the text gradients travel with
  their chunks there) and the backward only scales them: three GEMMs a block instead of four, one
  circulation instead of two, and one b x b buffer per block, reused in place. With
  z = t <x, y> + b and the positives only on the diagonal of the local block, the block's loss is
  sum softplus(z) - sum diag(z) and d loss / dz = sigmoid(z) - [positive], so labels are never
  built, and d / dt' = sum_i <x_i, (D Y)_i> re-uses the image gradient's GEMM instead of a b x b
  product. The softplus's output is the only other b x b buffer, briefly: at most 2 at once.
  Eager PyTorch on purpose: no compile time, the same code on CPU and GPU; what is left between
  the GEMMs is four passes over the block (softplus, its sum, the sigmoid in place, its sum).

Precision (``pali3_train.precision``): the loss is computed in fp32 whatever the embeddings'
dtype. Texts travel in their own dtype (bf16 texts are exact in bf16: half the bytes on the
wire) and are upcast where they are scored; logits, sums and the travelling gradient
accumulators are fp32; the gradients are returned in the inputs' dtypes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from pali3_train.precision import upcast

TAG_TEXT, TAG_GRAD, TAG_HOME = 0, 1, 2


def ring_sigmoid_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    group: ProcessGroup | None = None,
    bidirectional: bool = True,
    kernel: str = "plain",
) -> torch.Tensor:
    """image_emb, text_emb [b, E] (this rank's pairs, L2-normalised); logit_scale t' and
    logit_bias b, shape [1] -> this rank's share l_r of the global loss (see the module text).
    ``group``: the data-parallel group (default: the world); one process is the dense loss.
    ``kernel``: "plain" or "fused" blocks (the module text)."""
    _check_batches(image_emb, text_emb, group)
    if kernel == "plain":
        return _RingSigmoidLoss.apply(image_emb, text_emb, logit_scale, logit_bias, group,
                                      bidirectional)  # fmt: skip
    if kernel != "fused":
        raise ValueError(f"ring loss kernel {kernel!r}: expected 'fused' or 'plain'")
    inputs = (image_emb, text_emb, logit_scale, logit_bias)
    # Decided here (autograd turns grad mode off inside forward), and alike on every rank.
    wants_grads = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    return _FusedRingSigmoidLoss.apply(*inputs, group, bidirectional, wants_grads)


# ------------------------------------------------------------------------------- the schedule


def hops(world: int, bidirectional: bool) -> list[tuple[int, ...]]:
    """The directions that move a chunk at each step after the local block: step k brings the
    texts of rank r - d*k for every listed direction d (+1: from the left, -1: from the right).
    Together the steps reach every other rank exactly once."""
    if not bidirectional:
        return [(1,)] * (world - 1)
    steps = [(1, -1)] * ((world - 1) // 2)
    if world % 2 == 0 and world > 1:
        steps.append((1,))  # the rank opposite: reached once, from one side
    return steps


def _check_batches(image_emb: torch.Tensor, text_emb: torch.Tensor, group) -> None:
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image {tuple(image_emb.shape)} and text {tuple(text_emb.shape)} "
                         "embeddings must pair up row by row")  # fmt: skip
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        sizes = torch.tensor(
            [len(image_emb), -len(image_emb)], dtype=torch.float64, device=image_emb.device
        )
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)  # two numbers, not embeddings
        if sizes[0] != -sizes[1]:
            raise ValueError(
                f"the ring sigmoid loss needs equal local batches on every rank; they range "
                f"from {int(-sizes[1])} to {int(sizes[0])} (this rank: {len(image_emb)})"
            )


# ---------------------------------------------------------------------------------- one block


def _labels(n: int, local: bool, like: torch.Tensor) -> torch.Tensor:
    """+1 for matching pairs (only in the block of a rank's own texts), -1 elsewhere."""
    if not local:
        return -torch.ones(n, n, dtype=like.dtype, device=like.device)
    return 2 * torch.eye(n, dtype=like.dtype, device=like.device) - 1


def _block_loss(img, txt, scale, bias, local: bool) -> torch.Tensor:
    """img, scale and bias in the loss's dtype; txt as it travelled."""
    logits = img @ txt.to(img.dtype).T * scale + bias
    return -F.logsigmoid(_labels(len(img), local, img) * logits).sum()


def _block_grads(img, txt, scale, bias, local: bool, upstream):
    """Gradients of ``upstream * _block_loss`` w.r.t. (txt, img, t', b), in img's dtype: the
    texts' first, as ``_circulate`` takes them."""
    txt = txt.to(img.dtype)
    dots = img @ txt.T
    labels = _labels(len(img), local, img)
    dlogits = -labels * torch.sigmoid(-labels * (dots * scale + bias)) * upstream
    return (
        dlogits.T @ img * scale,
        dlogits @ txt * scale,
        (dlogits * dots).sum() * scale,  # d logits / d t' = t * <x, y>
        dlogits.sum(),
    )


@dataclass(frozen=True)
class _FusedBlock:
    """One block's loss and gradient terms in one pass over one b x b buffer (the module text).
    ``img_t`` = t x, ``bias`` in its dtype; ``upstream`` = 1/b, or None for the loss alone."""

    img_t: torch.Tensor
    bias: torch.Tensor
    upstream: float | None

    def __call__(self, txt: torch.Tensor, local: bool) -> tuple:
        """-> (the texts' gradient, the loss, D Y [b, E], sum D), D = d loss / dz; or
        (None, the loss) without gradients."""
        txt = txt.to(self.img_t.dtype)
        logits = torch.addmm(self.bias, self.img_t, txt.T)  # z [b, b]
        loss = F.softplus(logits).sum()
        if local:
            loss = loss - logits.diagonal().sum()  # positives: softplus(-z) = softplus(z) - z
        if self.upstream is None:
            return None, loss
        dz = logits.sigmoid_()  # D for the negatives, over z's buffer
        if local:
            dz.diagonal().sub_(1)
        return (dz.T @ self.img_t).mul_(self.upstream), loss, dz @ txt, dz.sum()


# ------------------------------------------------------------------------------ communication


class _Ring:
    """Point-to-point moves of chunks between neighbours in ``group``."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0

    def peer(self, offset: int) -> int:
        """The global rank ``offset`` places along the ring (P2P ops take global ranks)."""
        group_rank = (self.rank + offset) % self.world
        return dist.get_global_rank(self.group, group_rank) if self.group else group_rank

    def start(self, sends: dict[int, torch.Tensor], offsets: dict[int, int], tag: int):
        """Send ``sends[d]`` to the rank ``offsets[d]`` ahead and receive as much from as far
        behind, for each key d; returns (works, received). ``tag`` keeps texts, gradient
        accumulators and returns apart when they travel between the same ranks at once."""
        ops, received = [], {}
        for d, tensor in sends.items():
            received[d] = torch.empty_like(tensor)
            ahead, behind = self.peer(offsets[d]), self.peer(-offsets[d])
            ops.append(dist.P2POp(dist.isend, tensor.contiguous(), ahead, self.group, tag))
            ops.append(dist.P2POp(dist.irecv, received[d], behind, self.group, tag))
        return (dist.batch_isend_irecv(ops) if ops else []), received

    @staticmethod
    def finish(pending) -> dict[int, torch.Tensor]:
        works, received = pending
        for work in works:
            work.wait()
        return received


# ------------------------------------------------------------------------------ autograd

Score = Callable[[torch.Tensor, bool], tuple]


class _RingSigmoidLoss(torch.autograd.Function):
    """The plain kernel: the loss in the forward, the texts sent round again in the backward."""

    @staticmethod
    def forward(ctx, img, txt, logit_scale, logit_bias, group, bidirectional):
        ring = _Ring(group)
        steps = hops(ring.world, bidirectional)
        scale, bias = upcast(logit_scale).exp(), upcast(logit_bias)
        # Values, not the parameters: a sharded optimizer may have released those by backward.
        ctx.save_for_backward(img, txt, scale.detach().clone(), bias.detach().clone())
        ctx.ring, ctx.steps = ring, steps
        _remember_dtypes(ctx, img, txt, logit_scale, logit_bias)
        img = upcast(img)
        _, (total,) = _circulate(
            ring, steps, txt, lambda held, local: (None, _block_loss(img, held, scale, bias, local))
        )
        return total / len(img)

    @staticmethod
    def backward(ctx, grad_out):
        img, txt, scale, bias = ctx.saved_tensors
        img, upstream = upcast(img), upcast(grad_out) / len(img)
        g_txt, (g_img, g_scale, g_bias) = _circulate(
            ctx.ring, ctx.steps, txt,
            lambda held, local: _block_grads(img, held, scale, bias, local, upstream),
        )  # fmt: skip
        return *_in_dtypes(ctx, g_img, g_txt, g_scale, g_bias), None, None


class _FusedRingSigmoidLoss(torch.autograd.Function):
    """The fused kernel: loss and gradients in the forward's one trip round the ring."""

    @staticmethod
    def forward(ctx, img, txt, logit_scale, logit_bias, group, bidirectional, wants_grads):
        ring = _Ring(group)
        _remember_dtypes(ctx, img, txt, logit_scale, logit_bias)
        x, b = upcast(img), len(img)
        scale = upcast(logit_scale).exp().to(x.dtype)
        block = _FusedBlock(
            x * scale, upcast(logit_bias).to(x.dtype), 1 / b if wants_grads else None
        )
        g_txt, (loss, *terms) = _circulate(ring, hops(ring.world, bidirectional), txt, block)
        if wants_grads:
            dz_y, dz_sum = terms
            g_img = dz_y.mul_(scale / b)
            # d / dt' = (1/b) sum_ij D_ij t <x_i, y_j> = sum_i <x_i, g_img_i>
            g_scale = torch.dot(x.reshape(-1), g_img.reshape(-1))
            ctx.save_for_backward(g_img, g_txt, g_scale, dz_sum / b)
        return loss / b

    @staticmethod
    def backward(ctx, grad_out):
        upstream = upcast(grad_out)
        grads = (g * upstream for g in ctx.saved_tensors)
        return *_in_dtypes(ctx, *grads), None, None, None


def _remember_dtypes(ctx, img, txt, logit_scale, logit_bias) -> None:
    ctx.shape = logit_scale.shape
    ctx.dtypes = (img.dtype, txt.dtype, logit_scale.dtype, logit_bias.dtype)


def _in_dtypes(ctx, g_img, g_txt, g_scale, g_bias) -> tuple[torch.Tensor, ...]:
    """The fp32 gradients as the inputs' shapes and dtypes."""
    grads = (g_img, g_txt, g_scale.reshape(ctx.shape), g_bias.reshape(ctx.shape))
    return tuple(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))


def _circulate(ring: _Ring, steps, txt: torch.Tensor, score: Score):
    """Score this rank's images against every text chunk of the group, its own first:
    ``score(chunk, local)`` -> (the gradient for the chunk's texts, or None, *terms). Each text
    gradient travels with its chunk, one hop behind it, gathering every rank's share, and a last
    hop returns it to the owner. Returns (this rank's text gradient or None, the terms summed
    over the blocks). Every hop but the last is in flight while a block is computed."""
    pending = _start_hop(ring, steps, 0, {d: txt for d in (1, -1)})
    g_txt, *totals = score(txt, True)
    accumulators: dict[int, torch.Tensor] = {}
    for k in range(len(steps)):
        held = _Ring.finish(pending)
        pending = _start_hop(ring, steps, k + 1, held)
        moving = {d: accumulators[d] for d in steps[k] if d in accumulators}
        arriving = ring.start(moving, {d: d for d in moving}, TAG_GRAD)
        fresh = {}
        for d in steps[k]:
            fresh[d], *terms = score(held[d], False)
            for total, term in zip(totals, terms):
                total.add_(term)  # the local block's fresh terms: summed in place
        arrived = _Ring.finish(arriving)
        if g_txt is not None:
            accumulators |= {d: arrived[d].add_(gt) if d in arrived else gt
                             for d, gt in fresh.items()}  # fmt: skip
    if g_txt is None:
        return None, totals
    for returned in _return_home(ring, steps, accumulators).values():
        g_txt.add_(returned)  # the local block's, fresh
    return g_txt, totals


def _start_hop(ring: _Ring, steps, k: int, held: dict[int, torch.Tensor]):
    """Begin moving the chunks for step k (each direction one hop along itself)."""
    if k >= len(steps):
        return [], {}
    return ring.start({d: held[d] for d in steps[k]}, {d: d for d in steps[k]}, TAG_TEXT)


def _return_home(ring: _Ring, steps, accumulators: dict[int, torch.Tensor]):
    """Each accumulator holds the gradient for the texts of rank r - d*k_d (k_d: the last step
    in direction d); send it straight back to that rank and receive ours."""
    distance = {d: sum(d in s for s in steps) for d in accumulators}
    offsets = {d: -d * distance[d] for d in accumulators}
    return _Ring.finish(ring.start(accumulators, offsets, TAG_HOME))
