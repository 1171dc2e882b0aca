"""SigLIP's sigmoid loss over the whole data-parallel batch, chunked and all-gather-free.

Rank r holds b images and b texts. It scores its images against the b texts it currently holds
(one b x b block of logits), then passes those texts to a neighbour by point-to-point exchange;
after n - 1 hops every image has met every text of the global batch, and no rank ever held more
than a block of logits or more than two chunks of foreign texts. The next chunk is in flight while
the current block is computed.

The backward pass recirculates the texts the same way (nothing from the forward is kept but the
inputs), and each travelling chunk carries an accumulator of the gradient its texts received on
the way; a last hop returns every accumulator to the rank that owns those texts.

Normalisation. Each rank returns l_r = (1/b) * sum over its images i and all texts j of
-log sigmoid(z_ij (t <x_i, y_j> + b)). The mean of l_r over ranks is the paper's loss over the
global batch, and so are the gradients once data parallelism averages them (DeepSpeed and DDP
do): the texts' owners receive the sum of every rank's contribution.

``bidirectional=True`` sends chunks both ways at once, so ceil((n - 1) / 2) steps instead of
n - 1.

Precision (``pali3_train.precision``): the loss is computed in fp32 whatever the embeddings'
dtype. Texts travel in their own dtype (bf16 texts are exact in bf16: half the bytes on the
wire) and are upcast where they are scored; logits, sums and the travelling gradient
accumulators are fp32; the gradients are returned in the inputs' dtypes.
"""

from __future__ import annotations

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
) -> torch.Tensor:
    """image_emb, text_emb [b, E] (this rank's pairs, L2-normalised); logit_scale t' and
    logit_bias b, shape [1] -> this rank's share l_r of the global loss (see the module text).
    ``group``: the data-parallel group (default: the world); one process is the dense loss."""
    _check_batches(image_emb, text_emb, group)
    return _RingSigmoidLoss.apply(image_emb, text_emb, logit_scale, logit_bias, group,
                                  bidirectional)  # fmt: skip


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
    """Gradients of ``upstream * _block_loss`` w.r.t. (img, txt, t', b), in img's dtype."""
    txt = txt.to(img.dtype)
    dots = img @ txt.T
    labels = _labels(len(img), local, img)
    dlogits = -labels * torch.sigmoid(-labels * (dots * scale + bias)) * upstream
    return (
        dlogits @ txt * scale,
        dlogits.T @ img * scale,
        (dlogits * dots).sum() * scale,  # d logits / d t' = t * <x, y>
        dlogits.sum(),
    )


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


class _RingSigmoidLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, txt, logit_scale, logit_bias, group, bidirectional):
        ring = _Ring(group)
        steps = hops(ring.world, bidirectional)
        scale, bias = upcast(logit_scale).exp(), upcast(logit_bias)
        # Values, not the parameters: a sharded optimizer may have released those by backward.
        ctx.save_for_backward(img, txt, scale.detach().clone(), bias.detach().clone())
        ctx.ring, ctx.steps, ctx.shape = ring, steps, logit_scale.shape
        ctx.dtypes = (img.dtype, txt.dtype, logit_scale.dtype, logit_bias.dtype)

        pending = _start_hop(ring, steps, 0, {d: txt for d in (1, -1)})
        img = upcast(img)
        total = _block_loss(img, txt, scale, bias, local=True)
        for k in range(len(steps)):
            held = _Ring.finish(pending)
            pending = _start_hop(ring, steps, k + 1, held)  # next chunks fly while we compute
            for d in steps[k]:
                total = total + _block_loss(img, held[d], scale, bias, local=False)
        return total / len(img)

    @staticmethod
    def backward(ctx, grad_out):
        img, txt, scale, logit_bias = ctx.saved_tensors
        ring, steps = ctx.ring, ctx.steps
        img, upstream = upcast(img), upcast(grad_out) / len(img)

        g_img, g_txt, g_scale, g_bias = _block_grads(img, txt, scale, logit_bias, True, upstream)
        accumulators: dict[int, torch.Tensor] = {}
        pending = _start_hop(ring, steps, 0, {d: txt for d in (1, -1)})
        for k in range(len(steps)):
            held = _Ring.finish(pending)
            pending = _start_hop(ring, steps, k + 1, held)
            if k > 0:  # each accumulator follows its chunk, one hop behind the texts
                moving = {d: accumulators[d] for d in steps[k]}
                accumulators |= _Ring.finish(ring.start(moving, {d: d for d in moving}, TAG_GRAD))
            for d in steps[k]:
                gi, gt, gs, gb = _block_grads(img, held[d], scale, logit_bias, False, upstream)
                g_img, g_scale, g_bias = g_img + gi, g_scale + gs, g_bias + gb
                accumulators[d] = accumulators[d] + gt if k > 0 else gt
        for returned in _return_home(ring, steps, accumulators).values():
            g_txt = g_txt + returned
        grads = (g_img, g_txt, g_scale.reshape(ctx.shape), g_bias.reshape(ctx.shape))
        return *(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)), None, None


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
