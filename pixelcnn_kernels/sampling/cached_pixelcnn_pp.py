"""Cached incremental sampling of :class:`~pixelcnn_kernels.models.PixelCNNPlusPlus`.

PixelCNN++ runs at three resolutions, with stride-2 convolutions down and transposed
convolutions up, and skips from the up pass to the down pass (Ramachandran et al. 2017
cache every layer at its own resolution). Here every activation map of the network is
a :class:`_Node`: a cache of its values plus which positions are computed. The logits
of pixel (i, j) are asked of the head; a node computes a position on first demand from
the windows of its input nodes that its convolution reads, and keeps it. A position is
first asked for while generating the first pixel whose logits depend on it, and by
causality its own inputs are then final, so each activation is computed once, when it
becomes computable: the u (down-shifted) streams one step ahead along the row, the
lower resolutions when the pixel at the corresponding position comes, and pixels
every image knows not at all until a later pixel needs them. Each gated resnet block
also caches its inner map ``c`` (its first conv, plus the 1×1 of its skips, before the
concat_elu that its second conv reads).

The sampler runs one of two ways:

- **demand-driven, PyTorch** (:class:`CachedPixelCNNPlusPlus`: the ``reference``
  backend, the default for CPU tensors, and float64): the graph above, run from Python
  with host-integer positions. A gated resnet block's position is about ten ops
  (``F.conv2d`` on the exact windows, the masked weights of the reference, all taps
  active for the shifted convolutions, the model's ``concat_elu`` op and the reference
  sigmoid gate); a shifted, down-sampling or transposed conv's is a gather of the input
  pixels its taps read and one batched product (:class:`_LinearNode`).
- **table-driven, fused** (:class:`TableCachedPixelCNNPlusPlus`: the ``triton`` and
  ``cuda`` backends in float32, float16 and bfloat16). Which (node, position) pairs a
  pixel step computes varies from pixel to pixel (resolutions, borders, known
  pixels), so the demand resolution is run once per run symbolically
  (:meth:`CachedPixelCNNPlusPlus.schedule`: nothing computed, the order recorded) and
  turned into small int tables on the device: per node and step p = i·W + j, its
  positions, padded to the node's most per step with empty slots. Every step then
  launches the same work, reading its positions from the tables at the device pixel
  counter: per gated resnet block one
  :func:`~pixelcnn_kernels.ops.sampling.resnet_position_step` (Triton or CUDA) for all
  its positions of the step, each computing the inner values its window needs that no
  earlier position computed (concat_elu, the shifted conv's taps read from the input
  node's cache, the 1×1 of concat_elu of the skips), then concat_elu, the second
  shifted conv over the inner window, the conditioning, a·σ(b) and the residual; per
  other node (the first shifted convs ``u_init`` and ``ul_init``, their sum, the
  stride-2 down-sampling convs and the transposed convs: 12 nodes against 64 blocks at
  nr_resnet 5) a gather, one batched product and a scatter on device indices (PyTorch
  ops, no host sync); then the head (elu, 1×1: PyTorch ops), the draw and the writes
  (one :func:`~pixelcnn_kernels.ops.sampling.dmol_draw_step`) and the counter increment. On a CUDA device that step is captured once in a CUDA
  graph and replayed for every pixel (eager steps, with a warning, where the capture
  fails): no Python and no host synchronisation per pixel. The tables depend only on
  the network's structure, the image size and the pixels every image knows, and are
  kept per model for later calls.

**Exactness** as for :mod:`~pixelcnn_kernels.sampling.cached_gated`: the same values
up to the rounding of the other reduction shapes, the draft checked and repaired by
:mod:`~pixelcnn_kernels.sampling.verify`; drafts equal the naive sampler's image in
float64 (tested), and in float32 on the table-driven path for tiny models (tested, eager
on the Triton interpreter; on a GPU also as a CUDA graph, bit for bit the eager steps);
float32 logits are as accurate as the full forward's (tested), and the table-driven
step's match the PyTorch graph's within the float32 tolerance (tested).
"""

from __future__ import annotations

import collections
import functools
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pixelcnn_kernels.ops.sampling import DMOL_DRAW_CUDA_OP, RESNET_CUDA_OP, ResnetStepWeights, dmol_draw_step, resnet_position_step, resnet_step_fits, step_backend
from pixelcnn_kernels.reference.gates import gate_sigmoid
from pixelcnn_kernels.reference.layers import GatedResnet, ShiftedConv2d, ShiftedConvTranspose2d
from pixelcnn_kernels.sampling.common import SamplingProblem, masked_operands, write_values
from pixelcnn_kernels.sampling.replay import PixelStepSampler

__all__ = ["CachedPixelCNNPlusPlus", "TableCachedPixelCNNPlusPlus", "fused_steps_fit", "sample_cached_pixelcnn_pp"]

# (rows, cols): a window of a node, in image coordinates (-1 and height/width being the padding).
Window = tuple[range, range]


class _Node:
    """One activation map (B, channels, height, width), computed position by position on demand.

    ``reads(i, j)`` lists the windows of other nodes that position (i, j) reads;
    ``compute(i, j)`` returns its (B, channels) value from them. The ``cache``
    (B, height + 2, width + 2, channels), channels-last as the step kernels read it, has
    a one-pixel ring of zeros around the image: the padding every convolution of the
    network reads (its windows reach at most one pixel outside); ``values`` is its
    (B, channels, ...) view, ``flat`` its (B, (height + 2)·(width + 2), channels) one.
    With ``record`` a list, :meth:`require` appends (node, i, j) to it instead of
    computing: the demand resolution run symbolically (:meth:`CachedPixelCNNPlusPlus.schedule`).
    """

    def __init__(self, channels: int, height: int, width: int, like: torch.Tensor, reads: Callable[[int, int], list[tuple[_Node, range, range]]] | None, compute: Callable[[int, int], torch.Tensor] | None):
        self.height, self.width = height, width
        self.cache = like.new_zeros(like.shape[0], height + 2, width + 2, channels)
        self.values = self.cache.permute(0, 3, 1, 2)
        self.flat = self.cache.view(like.shape[0], (height + 2) * (width + 2), channels)
        self.reads, self.compute = reads, compute
        self.done = [[compute is None] * width for _ in range(height)]
        self.record: list[tuple[_Node, int, int]] | None = None

    def padded_index(self, i: int, j: int) -> int:
        """The index of (i, j) (image coordinates, the ring included) in ``flat``."""
        return (i + 1) * (self.width + 2) + j + 1

    def require(self, rows: range, cols: range) -> None:
        """Computes (or records) the positions of rows × cols not done yet, each after the inputs it reads."""
        for r in range(max(rows.start, 0), min(rows.stop, self.height)):
            for c in range(max(cols.start, 0), min(cols.stop, self.width)):
                if not self.done[r][c]:
                    for node, node_rows, node_cols in self.reads(r, c):
                        node.require(node_rows, node_cols)
                    if self.record is None:
                        self.cache[:, r + 1, c + 1] = self.compute(r, c)
                    else:
                        self.record.append((self, r, c))
                    self.done[r][c] = True

    def window(self, rows: range, cols: range) -> torch.Tensor:
        """The values at rows × cols, computed if need be."""
        self.require(rows, cols)
        return self.values[:, :, rows.start + 1 : rows.stop + 1, cols.start + 1 : cols.stop + 1]

    def at(self, i: int, j: int) -> torch.Tensor:
        """The (B, channels, 1, 1) value at (i, j)."""
        return self.window(range(i, i + 1), range(j, j + 1))


# Terms of a linear node's position: per source, (row, col, tap) triples (image coordinates).
Terms = list[list[tuple[int, int, int]]]


class _LinearNode(_Node):
    """``bias + Σ_k Σ_(r, c, t) sources[k][r, c] · weights[k][t]`` (``weights[k]`` None: the identity).

    A shifted conv, a transposed conv or the sum of two nodes, by its ``terms(i, j)``
    (per source, the (row, col, tap) it reads; none at all: the value is zero, a
    shift's zero row or column). ``weights[k]``: (taps, Cin, Cout). :meth:`linear`
    computes positions from padded indices on the device, which both the demand-driven
    and the table-driven samplers call.
    """

    def __init__(self, channels: int, height: int, width: int, sources: list[_Node], weights: list[torch.Tensor | None], bias: torch.Tensor | None, terms: Callable[[int, int], Terms]):
        self.sources, self.weights, self.bias, self.terms = sources, weights, bias, terms

        def reads(i: int, j: int) -> list[tuple[_Node, range, range]]:
            return [(source, range(r, r + 1), range(c, c + 1)) for source, source_terms in zip(sources, terms(i, j)) for r, c, _ in source_terms]

        super().__init__(channels, height, width, sources[0].values, reads, self._compute)

    def linear(self, index: list[torch.Tensor], taps: list[torch.Tensor | None]) -> torch.Tensor:
        """(B, S, Cout): for S positions, ``bias + Σ_k Σ_t sources[k].flat[:, index[k][s, t]] · weights[k][taps[k][s, t]]``.

        ``index[k]``, ``taps[k]`` (S, T_k) int64; ``taps[k]`` None: tap t is the weight's
        t-th for every position (T_k the weight's taps), so the product takes the weight
        as it is, one matrix product, where per-position taps gather a copy of it.
        """
        out = 0 if self.bias is None else self.bias
        for source, weight, source_index, source_taps in zip(self.sources, self.weights, index, taps):
            gathered = source.flat.index_select(1, source_index.flatten()).unflatten(1, source_index.shape)  # (B, S, T, Cin)
            if weight is None:
                product = gathered.sum(2)
            elif source_taps is None:
                product = gathered.flatten(2) @ weight.flatten(0, 1)
            else:
                product = torch.einsum("bstc,stcd->bsd", gathered, weight[source_taps])
            out = out + product
        return out

    def _compute(self, i: int, j: int) -> torch.Tensor:
        terms = self.terms(i, j)
        if not any(terms):
            return self.cache.new_zeros(1)  # the shift's zero row / column (broadcast)
        device = self.cache.device
        index = [torch.tensor([[source.padded_index(r, c) for r, c, _ in t]], device=device) for source, t in zip(self.sources, terms)]
        taps = [torch.tensor([[tap for _, _, tap in t]], device=device) for t in terms]
        return self.linear(index, taps)[:, 0]


def _conv_node(conv: ShiftedConv2d, source: _Node, dtype: torch.dtype) -> _LinearNode:
    """``conv`` (stride 1 or 2, with or without its output shift) on ``source``."""
    weight, bias = masked_operands(conv, dtype)
    stride = conv.stride[0]
    top, _, left, _ = conv.spec.padding()
    kh, kw = conv.spec.kernel_size
    # The output shift moves the conv's output one row down ("down") or one column right.
    shift = (0, 0) if not conv.shift_output else (1, 0) if conv.shift == "down" else (0, 1)

    def terms(i: int, j: int) -> Terms:
        i, j = i - shift[0], j - shift[1]
        if i < 0 or j < 0:
            return [[]]
        return [[(stride * i - top + tap // kw, stride * j - left + tap % kw, tap) for tap in range(kh * kw)]]

    taps = weight.permute(2, 3, 1, 0).reshape(kh * kw, conv.in_channels, conv.out_channels)
    return _LinearNode(conv.out_channels, -(-source.height // stride), -(-source.width // stride), [source], [taps], bias, terms)


def _transposed_node(deconv: ShiftedConvTranspose2d, source: _Node, dtype: torch.dtype) -> _LinearNode:
    """``deconv`` (stride 2, cropped as :class:`ShiftedConvTranspose2d` does) on ``source``.

    Output (i, j) of the uncropped transposed conv sums input (i', j') times kernel tap
    (i - 2i', j - 2j'); the crop drops the first ``(kw-1)/2`` columns ("down", kernel
    2×3) or none ("down_right", 2×2), and the rows past 2H.
    """
    weight = deconv.weight.to(dtype)  # (in, out, kh, kw)
    stride = deconv.stride[0]
    kh, kw = deconv.kernel_size  # kernel rows = stride: output row i reads input row i // stride at tap i % stride
    col_offset = (kw - 1) // 2 if deconv.shift == "down" else 0

    def terms(i: int, j: int) -> Terms:
        full_col = j + col_offset
        tap_row, source_row = i % stride, i // stride
        columns = ((full_col - tap_col) // stride for tap_col in range(full_col % stride, kw, stride))
        return [[(source_row, c, tap_row * kw + full_col - stride * c) for c in columns if 0 <= c < source.width]]

    taps = weight.permute(2, 3, 0, 1).reshape(kh * kw, deconv.in_channels, deconv.out_channels)
    return _LinearNode(deconv.out_channels, stride * source.height, stride * source.width, [source], [taps], deconv.bias.to(dtype), terms)


class _ResnetNode(_Node):
    """``block(source, cat(skips), cond)``, its inner map ``c`` (before the concat_elu that ``conv_out`` reads) a node of its own.

    Computed by PyTorch ops (``F.conv2d`` on the exact windows, the masked weights of
    the reference, all taps active for the shifted convolutions, the model's
    ``concat_elu`` op and the reference sigmoid gate); the table-driven sampler
    computes a position and its new inner pixels in one fused step instead.
    """

    def __init__(self, block: GatedResnet, source: _Node, skips: list[_Node], class_vector: torch.Tensor | None, dtype: torch.dtype):
        self.block, self.source, self.skips = block, source, skips
        self.cond = None if block.cond_proj is None else block.cond_proj(class_vector)
        top, _, left, _ = block.conv_input.spec.padding()
        kh, kw = block.conv_input.spec.kernel_size

        def window(i: int, j: int) -> Window:
            return range(i - top, i - top + kh), range(j - left, j - left + kw)

        concat_elu = block.ops.concat_elu

        @functools.cache
        def operands():
            """The masked weights, made on first use: the table-driven sampler packs its own and never computes here."""
            skip = masked_operands(block.nin_skip, dtype) if skips else (None, None)
            return masked_operands(block.conv_input, dtype), masked_operands(block.conv_out, dtype), skip

        def inner_reads(i: int, j: int) -> list[tuple[_Node, range, range]]:
            return [(source, *window(i, j))] + [(skip, range(i, i + 1), range(j, j + 1)) for skip in skips]

        def compute_inner(i: int, j: int) -> torch.Tensor:
            (in_weight, in_bias), _, (skip_weight, skip_bias) = operands()
            c = F.conv2d(concat_elu(source.window(*window(i, j))), in_weight, in_bias)
            if skips:
                skip = torch.cat([node.at(i, j) for node in skips], dim=1)
                c = c + F.conv2d(concat_elu(skip), skip_weight, skip_bias)
            return c[:, :, 0, 0]

        self.inner = _Node(block.channels, source.height, source.width, source.values, inner_reads, compute_inner)

        def reads(i: int, j: int) -> list[tuple[_Node, range, range]]:
            return [(self.inner, *window(i, j)), (source, range(i, i + 1), range(j, j + 1))]

        def compute(i: int, j: int) -> torch.Tensor:
            # dropout: identity in eval mode
            _, (out_weight, out_bias), _ = operands()
            pre = F.conv2d(concat_elu(self.inner.window(*window(i, j))), out_weight, out_bias)
            return (source.at(i, j) + gate_sigmoid(pre, 1, self.cond))[:, :, 0, 0]

        super().__init__(block.channels, source.height, source.width, source.values, reads, compute)


class CachedPixelCNNPlusPlus:
    """The activation caches of one cached sampling run of a PixelCNNPlusPlus ``model``, demand-driven.

    Mirrors ``PixelCNNPlusPlus.network`` node for node; ``nodes`` lists them in the
    order they are built, inputs first. :meth:`logits` gives pixel (i, j)'s DMOL
    parameters (B, P, 1, 1), computing what it needs with PyTorch ops; :meth:`store_pixel`
    enters a drawn pixel; :meth:`schedule` runs the demand resolution symbolically.
    """

    def __init__(self, model, problem: SamplingProblem):
        dtype = model.parameter_dtype()
        inputs = model.to_inputs(problem.images)
        self.model = model
        self.x = _Node(model.in_channels + 1, problem.height, problem.width, inputs, None, None)
        # The image with a channel of ones, so that the zero padding is distinguishable.
        self.x.values[:, :, 1:-1, 1:-1] = torch.cat((inputs, torch.ones_like(inputs[:, :1])), dim=1)
        self.nodes: list[_Node] = []
        add = self._add
        u_list = [add(_conv_node(model.u_init, self.x, dtype))]
        ul_parts = [add(_conv_node(conv, self.x, dtype)) for conv in model.ul_init]
        ul_list = [add(_LinearNode(model.u_init.out_channels, problem.height, problem.width, ul_parts, [None, None], None, lambda i, j: [[(i, j, 0)], [(i, j, 0)]]))]
        class_vector = problem.class_vector
        for stage, up_layer in enumerate(model.up_layers):
            for u_block, ul_block in zip(up_layer.u_stream, up_layer.ul_stream):
                u_list.append(add(_ResnetNode(u_block, u_list[-1], [], class_vector, dtype)))
                ul_list.append(add(_ResnetNode(ul_block, ul_list[-1], [u_list[-1]], class_vector, dtype)))
            if stage < len(model.up_layers) - 1:
                u_list.append(add(_conv_node(model.downsize_u_stream[stage], u_list[-1], dtype)))
                ul_list.append(add(_conv_node(model.downsize_ul_stream[stage], ul_list[-1], dtype)))
        u, ul = u_list.pop(), ul_list.pop()
        for stage, down_layer in enumerate(model.down_layers):
            for u_block, ul_block in zip(down_layer.u_stream, down_layer.ul_stream):
                u = add(_ResnetNode(u_block, u, [u_list.pop()], class_vector, dtype))
                ul = add(_ResnetNode(ul_block, ul, [u, ul_list.pop()], class_vector, dtype))
            if stage < len(model.down_layers) - 1:
                u = add(_transposed_node(model.upsize_u_stream[stage], u, dtype))
                ul = add(_transposed_node(model.upsize_ul_stream[stage], ul, dtype))
        self.ul = ul
        self.head_weight, self.head_bias = masked_operands(model.nin_out, dtype)

    def _add(self, node: _Node) -> _Node:
        self.nodes.extend([node.inner, node] if isinstance(node, _ResnetNode) else [node])
        return node

    def head(self, ul: torch.Tensor) -> torch.Tensor:
        """``nin_out(elu(ul))`` of the (B, C, 1, 1) ``ul``: (B, P, 1, 1)."""
        return F.conv2d(F.elu(ul), self.head_weight, self.head_bias)

    def logits(self, i: int, j: int) -> torch.Tensor:
        """``nin_out(elu(ul))`` at pixel (i, j): (B, P, 1, 1)."""
        return self.head(self.ul.at(i, j))

    def store_pixel(self, i: int, j: int, values: torch.Tensor) -> None:
        """Enters the integer values (B, C, 1, 1) of pixel (i, j)."""
        self.x.values[:, :-1, i + 1 : i + 2, j + 1 : j + 2] = self.model.to_inputs(values)

    def schedule(self, skipped: list[list[bool]]) -> list[list[tuple[_Node, int, int]]]:
        """Per pixel step p = i·W + j, the (node, i, j) that :meth:`logits` (i, j) computes, in its order.

        The demand resolution run without computing anything (nothing at a ``skipped``
        pixel, one every image knows: no logits are asked there); the caches are left as
        they were.
        """
        record: list[tuple[_Node, int, int]] = []
        done = [[row[:] for row in node.done] for node in self.nodes]
        for node in self.nodes:
            node.record = record
        steps = []
        try:
            for i, row in enumerate(skipped):
                for j, known in enumerate(row):
                    if not known:
                        self.ul.require(range(i, i + 1), range(j, j + 1))
                    steps.append(record[:])
                    record.clear()
        finally:
            for node, node_done in zip(self.nodes, done):
                node.record, node.done = None, node_done
        return steps


def _linear_tables(node: _LinearNode, positions: list[tuple[int, _Node, int, int]], steps: int) -> list[torch.Tensor]:
    """A :class:`_LinearNode`'s positions per step as host tables: ``dest`` (steps, S), then per source ``index`` and ``taps`` (steps, S, T).

    Slot s of step p: the node's s-th position there, its padded index ``dest`` and its
    terms' padded ``index`` and ``taps`` per source (padded with the zero corner of the
    source's ring, tap 0). An empty slot has ``dest`` 0, the node's own corner, which no
    position has: it writes zero there (the ring stays zero). Positions whose value is
    zero (no terms: a shift's zero row or column) are left out: the cache holds that
    zero already. ``positions``: (p, node, i, j) in the order computed.
    """
    entries = collections.defaultdict(list)
    for p, _, i, j in positions:
        if any(terms := node.terms(i, j)):
            entries[p].append((node.padded_index(i, j), terms))
    slots = max(map(len, entries.values()), default=0)
    counts = [max((len(terms[k]) for step in entries.values() for _, terms in step), default=0) for k in range(len(node.sources))]
    at = [(p, slot) for p, step in entries.items() for slot in range(len(step))]
    dest = torch.zeros(steps, slots, dtype=torch.int64)
    if at:
        dest[tuple(torch.tensor(at).T)] = torch.tensor([padded for step in entries.values() for padded, _ in step])
    tables = [dest]
    for k, (source, count) in enumerate(zip(node.sources, counts)):
        index, taps = torch.zeros(steps, slots, count, dtype=torch.int64), torch.zeros(steps, slots, count, dtype=torch.int64)
        terms = [(p, slot, t, source.padded_index(r, c), tap) for p, step in entries.items() for slot, (_, all_terms) in enumerate(step) for t, (r, c, tap) in enumerate(all_terms[k])]
        if terms:
            p, slot, t, padded, tap = torch.tensor(terms).T
            index[p, slot, t], taps[p, slot, t] = padded, tap
        tables += [index, taps]
    return tables


def _resnet_table(node: _ResnetNode, positions: list[tuple[int, _Node, int, int]], steps: int) -> torch.Tensor:
    """A :class:`_ResnetNode`'s positions per step as a host :func:`~pixelcnn_kernels.ops.sampling.resnet_position_step` table (steps, S, 3).

    ``positions``: (p, the node or its inner node, i, j) in the order computed. A
    position's ``new_taps`` are the inner pixels the demand resolution computed right
    before it (only the block reads its inner map).
    """
    top, _, left, _ = node.block.conv_input.spec.padding()
    kh, kw = node.block.conv_input.spec.kernel_size
    entries, pending = collections.defaultdict(list), []
    for p, owner, i, j in positions:
        if owner is node.inner:
            pending.append((i, j))
            continue
        taps = [((r - i + top) * kw + c - j + left, 0 <= r - i + top < kh and 0 <= c - j + left < kw) for r, c in pending]
        if not all(inside for _, inside in taps):
            raise AssertionError(f"inner pixels computed for ({i}, {j}) lie outside its window: {pending}")
        entries[p].append((i, j, sum(1 << tap for tap, _ in taps)))
        pending = []
    slots = max(map(len, entries.values()), default=0)
    table = torch.full((steps, slots, 3), -1, dtype=torch.int32)
    at = [(p, slot) for p, step in entries.items() for slot in range(len(step))]
    if at:
        table[tuple(torch.tensor(at).T)] = torch.tensor([entry for step in entries.values() for entry in step], dtype=torch.int32)
    return table


# model -> {(height, width, skipped pixels): each node's host tables}: the tables are a function
# of the network's structure, the image size and the skipped pixels (those every image knows) only,
# so repeated sample calls on one model build them once. (A model's structure is fixed once it is built.)
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _host_tables(graph: CachedPixelCNNPlusPlus, skipped: list[list[bool]]) -> list[list[torch.Tensor] | torch.Tensor | None]:
    """Per node of ``graph``: its host tables (:func:`_linear_tables`, :func:`_resnet_table`), None for a node computed by its block."""
    key = (len(skipped), len(skipped[0]) if skipped else 0, tuple(map(tuple, skipped)))
    per_model = _TABLES.setdefault(graph.model, {})
    if key not in per_model:
        order = graph.schedule(skipped)
        # Each node's (p, node, i, j) in the order computed, a block's inner positions under the block.
        owner = {node.inner: node for node in graph.nodes if isinstance(node, _ResnetNode)}
        positions = {node: [] for node in graph.nodes}
        for p, step in enumerate(order):
            for node, i, j in step:
                positions[owner.get(node, node)].append((p, node, i, j))
        tables = {_LinearNode: _linear_tables, _ResnetNode: _resnet_table}
        per_model[key] = [tables[type(node)](node, positions[node], len(order)) if type(node) in tables else None for node in graph.nodes]
    return per_model[key]


class _LinearStep:
    """A :class:`_LinearNode`'s table-driven step: at the step ``pixel``, its slots' values (gather, batched product) scattered into its cache.

    The node's tables (:func:`_linear_tables`) travel as one (steps, ·) device tensor,
    each step's row holding every table's (S, ·) entries flattened one after another,
    so a step reads its positions with one gather. A source whose every position reads
    all its weight's taps in order (a shifted conv's) multiplies by the weight as it is
    (:meth:`_LinearNode.linear`).
    """

    def __init__(self, node: _LinearNode, tables: list[torch.Tensor], pixel: torch.Tensor):
        self.node, self.pixel = node, pixel
        dest, *terms = tables
        self.slots = dest.shape[1]
        self.shapes = [t.shape[1:] for t in tables]
        self.packed = torch.cat([t.flatten(1) for t in tables], dim=1).to(node.cache.device)
        empty = dest == 0
        self.in_order = [
            weight is not None and taps.shape[2] == weight.shape[0] and bool(((taps == torch.arange(taps.shape[2])).all(2) | empty).all())
            for weight, taps in zip(node.weights, terms[1::2])
        ]  # fmt: skip

    def __call__(self) -> None:
        if self.slots == 0:
            return
        row = self.packed.index_select(0, self.pixel)[0]
        dest, *terms = (part.view(shape) for part, shape in zip(row.split([shape.numel() for shape in self.shapes]), self.shapes))
        taps = [None if in_order else source_taps for source_taps, in_order in zip(terms[1::2], self.in_order)]
        value = self.node.linear(terms[0::2], taps)
        # An empty slot (dest 0, the node's corner) writes zero: the ring stays zero.
        value = torch.where((dest != 0)[:, None], value, 0)
        self.node.flat.index_copy_(1, dest, value)


class _ResnetStep:
    """A :class:`_ResnetNode`'s table-driven step: one :func:`~pixelcnn_kernels.ops.sampling.resnet_position_step` for all its positions of the step ``pixel``."""

    def __init__(self, node: _ResnetNode, table: torch.Tensor, pixel: torch.Tensor, dtype: torch.dtype):
        self.node, self.pixel, self.table = node, pixel, table.to(node.cache.device)
        self.weights = ResnetStepWeights.from_block(node.block, dtype)

    def __call__(self) -> None:
        if self.table.shape[1] == 0:
            return
        node = self.node
        resnet_position_step(self.pixel, self.table, node.source.cache, node.inner.cache, [skip.cache for skip in node.skips], node.cond, self.weights, node.cache)


class TableCachedPixelCNNPlusPlus(PixelStepSampler):
    """One cached sampling run of a PixelCNNPlusPlus ``model`` as a uniform, table-driven pixel step.

    The demand-driven graph (:class:`CachedPixelCNNPlusPlus`) is built and its
    :meth:`~CachedPixelCNNPlusPlus.schedule` taken once; every node then gets a
    table of the positions it computes at each step p (padded to its most per step,
    empty slots doing nothing), on the device. The pixel being generated is the device
    tensor ``pixel`` (int64 (1,), p = i·W + j), so :meth:`pixel_step` launches, for
    every node in the graph's order, the same work on the same addresses at every
    pixel: the gated resnet blocks one fused :func:`~pixelcnn_kernels.ops.sampling.resnet_position_step`
    each (all its positions of the step, their new inner pixels included), the other
    nodes a few PyTorch ops on device indices (a gather, a batched product, a scatter);
    then the head, the draw, the writes and ``pixel += 1``. One CUDA graph can replay
    it: :meth:`sample` (``cuda_graph=None``: a graph on a CUDA device, eager steps with a
    warning where the capture fails; True: a graph or an error; False: eager steps) fills
    ``problem.images`` and returns whether a graph ran. Needs :func:`fused_steps_fit`.
    """

    def __init__(self, model, problem: SamplingProblem):
        images = problem.images
        _, channels, height, width = images.shape
        super().__init__(model, problem)
        self.graph = graph = CachedPixelCNNPlusPlus(model, problem)
        self.steps: list[Callable[[], None]] = []
        for node, tables in zip(graph.nodes, _host_tables(graph, problem.skipped_pixels())):
            if isinstance(node, _LinearNode):
                self.steps.append(_LinearStep(node, tables, self.pixel))
            elif isinstance(node, _ResnetNode):
                self.steps.append(_ResnetStep(node, tables, self.pixel, model.parameter_dtype()))
        # Pixel p's index in the x and ul caches' flat views (they share the image's size).
        self.padded_pixel = torch.tensor([graph.x.padded_index(i, j) for i in range(height) for j in range(width)], device=images.device)
        # The network's input in the x cache, (B, C, padded positions): the draw writes pixel p at padded_pixel[p].
        self.inputs = graph.x.flat[:, :, :channels].transpose(1, 2)

    def logits(self, padded_pixel: torch.Tensor) -> torch.Tensor:
        """The head at the pixel (``padded_pixel``: its index in the caches' flat views): (B, P, 1, 1); run after the step's nodes."""
        ul = self.graph.ul.flat.index_select(1, padded_pixel)
        return self.graph.head(ul.transpose(1, 2)[..., None])

    def pixel_step(self, draw: bool = True) -> None:
        """Computes the step's positions of every node, draws the pixel and writes it (except where known), and moves to the next pixel.

        ``draw=False`` (eager only, at a pixel every image knows, whose step computes nothing): only the move.
        """
        if draw:
            for step in self.steps:
                step()
            logits = self.logits(self.padded_pixel.index_select(0, self.pixel)).flatten(1)
            dmol_draw_step(self.pixel, logits, self.noise_flat, self.known_flat, self.images_flat, self.inputs, self.bin_inputs, input_index=self.padded_pixel)
        self.pixel += 1


def fused_steps_fit(model) -> bool:
    """Whether :class:`TableCachedPixelCNNPlusPlus` can sample ``model``: its block step and its draw each
    have a kernel backend for the parameters (:func:`~pixelcnn_kernels.ops.sampling.step_backend`)
    and the block step's takes every gated resnet's sizes (:func:`~pixelcnn_kernels.ops.sampling.resnet_step_fits`)."""
    weight = model.nin_out.weight
    block_backend = step_backend(weight, RESNET_CUDA_OP)
    if block_backend is None or step_backend(weight, DMOL_DRAW_CUDA_OP) is None:
        return False
    blocks = (module for module in model.modules() if isinstance(module, GatedResnet))
    return all(resnet_step_fits(block_backend, len(block.conv_input.spec.taps), block.skip_streams, block.channels) for block in blocks)


def sample_cached_pixelcnn_pp(model, problem: SamplingProblem, progress: bool) -> int:
    """Fills ``problem.images`` by cached incremental generation; returns 0 (no full network pass runs).

    ``model`` is a :class:`~pixelcnn_kernels.models.PixelCNNPlusPlus` in eval mode,
    called under ``torch.no_grad``. Where :func:`fused_steps_fit` holds, the table-driven step
    (:class:`TableCachedPixelCNNPlusPlus`, a CUDA graph on a CUDA device); elsewhere the
    demand-driven PyTorch graph (:class:`CachedPixelCNNPlusPlus`).
    """
    if fused_steps_fit(model):
        TableCachedPixelCNNPlusPlus(model, problem).sample(progress)
        return 0
    cached = CachedPixelCNNPlusPlus(model, problem)
    skipped = problem.skipped_pixels()
    (channels,) = model.step_channels()  # the DMOL head draws a pixel's channels together
    with tqdm(total=problem.height * problem.width, desc="sampling (cached)", unit="pixel", disable=not progress) as bar:
        for i in range(problem.height):
            for j in range(problem.width):
                if not skipped[i][j]:
                    drawn = model.draw_values(cached.logits(i, j), problem.noise_window(i, j))
                    write_values(problem, i, j, channels, drawn[:, channels, 0, 0])
                    cached.store_pixel(i, j, problem.images[:, :, i : i + 1, j : j + 1])
                bar.update()
    return 0
