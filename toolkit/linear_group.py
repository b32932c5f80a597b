"""Linears that read the same input (q/k/v, gate/up) run as one at inference.

A decode step on CPU is bound by bytes of weight and by per-op overhead: three small kernel calls cost more than
one call over the three weights stacked, and three rank-16 LoRA products cost more than one over the stacked A
matrices. So, at inference only (no autograd), a group of linears computes:

    h = x @ A_stack.T;  y = base_stack(x);  y[:, rows_j] += h[:, cols_j] @ (s_j B_j).T;  then split per linear

base_stack: the members' packed weights concatenated (toolkit.qkernels form), when every member is a quantized
linear on the CPU kernel path with the same kernel kind; otherwise each base runs on its own.
A_stack [R, in]: every active adapter's A of every member, so one small matmul serves them all; each B (scale
folded in) then adds into its member's rows in place. (A block-diagonal B would be one op, but its zeros are
read from memory on every token: measured no faster.) Trainable adapters (finetune) keep the per-module path,
so training never reads a stale copy.

The other linears (attn_output, ffn_down, output) run as groups of one, so every adapter scale lives in a plan's
B copies as data: a compiled decode step (Transformer.compile_decode) then reads new scales without recompiling.
Each member adds its adapters into its own view of the stacked output: in place eager, out of place compiled (an
in-place add into rows of the stacked output lowers to a masked scatter over all of it); the A/B copies have
static shapes. A plan keeps all its A/B copies in one flat tensor, sliced by offsets (plain ints), and before
compiled steps pack_plans copies every plan's into one arena for the whole model: a compiled step checks a tensor
guard (dtype, shape, strides) on every tensor it reads before each call, even in the guard-skipping stance, so each
tensor costs every decode step (measured: one per factor made the adapter's guards cost more than its arithmetic;
one per plan, 120 for SmolLM2, still ~0.1-0.3 ms a token more than one arena).

Batched steps whose rows use different adapter sets (toolkit.infer.batch, S-LoRA / Punica style) take the same
base product once for all rows and add each adapter only to its rows, with no loop over rows: a plan's row form
stacks every loaded adapter's A (as above) and alpha-scaled B, and the step's RowAdapters give each row's user
scales, so with S [B, R] (row b's scale for the adapter owning column c of h, 0 where row b does not use it):

    h = x @ A_all.T;  y_j += (h * S)[..., cols_j] @ B_j.T   for each member j, over its adapters in use by some
                                                            row (their s * B side by side: one product)

Which rows use what is data (S), not structure; a step where no row uses an adapter does no adapter work.
A compiled step calls the row adapters of each group as one opaque op (toolkit::row_adapters) that runs the
eager form above: inductor compiles everything around it, and its own code over every loaded adapter's columns
for every row was slower than these library GEMMs over the adapters in use (and took minutes to compile). The
graph then holds no adapter structure: loading or unloading adapters never compiles it again.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import qkernels
from .lora import LoRALinear, thin_linear
from .qlinear import QuantLinear


@dataclass
class RowAdapters:
    """Per-row adapter scales of one batched step: scales [B, n] float32, row b's user scale of adapter names[i]
    (0: the row does not use it). used: the i that some row uses. One object can serve many steps of the same
    rows; it caches what each plan's row adapters need for them (_row_terms)."""
    names: tuple[str, ...]
    scales: Tensor
    used: tuple[int, ...]
    any: bool = True  # some row uses an adapter (what a compiled step branches on: not which ones)

    @classmethod
    def make(cls, names: tuple[str, ...], per_row: list[dict[str, float] | None], device=None) -> "RowAdapters":
        index = {n: i for i, n in enumerate(names)}
        scales = torch.zeros(len(per_row), len(names))
        for b, sets in enumerate(per_row):
            for n, sc in (sets or {}).items():
                scales[b, index[n]] = float(sc)
        used = tuple(i for i in range(len(names)) if bool(scales[:, i].ne(0).any()))
        return cls(tuple(names), scales.to(device) if device is not None else scales, used, bool(used))


@dataclass
class _RowLora:
    """A plan's row form: the adapters some row uses, of each member (in RowAdapters.names order), user scales left
    out."""
    key: tuple
    a: Tensor  # A_all [R, in] float32, member by member
    parts: list[tuple[int, int, int]]  # (member, first column of h, its columns R_j: all its adapters' ranks)
    b: list[Tensor]  # per member: its adapters' alpha / rank * B side by side [out_j, R_j] float32 (one product)
    col_adapter: Tensor  # [R] long: adapter index of each column of h


@dataclass
class _Plan:
    key: tuple
    sizes: list[int]
    bases: list[nn.Module]  # the members' base linears (inside any LoRA wrapper)
    base: qkernels.PackedWeight | None  # the stacked kernel weight, or None: bases run one by one
    base16: qkernels.PackedWeight | None  # the stacked bf16 copy for many rows (bases' use_bf16_copy), or None
    bias: Tensor | None
    lora: Tensor | None  # float32, flat: A_stack [R, in], then each adapter's s * B [out_j, r]
    a_shape: tuple[int, int]  # (R, in)
    b_parts: list[tuple[int, int, int, int, int]]  # (member, first column of h, offset in lora, out_j, r)
    views: tuple[Tensor | None, list[Tensor]]  # A_stack and the s * B as views of lora, for eager steps
    per_module_lora: bool  # trainable or DoRA adapters: each LoRALinear adds its own
    arena_span: tuple[int, int] | None = None  # lora's place in the model's arena (pack_plans), once packed
    group: int = 0  # the (owner, member names) id under which the row_adapters op finds this plan's successors


_group_ids = itertools.count(1)
_groups: dict[int, tuple[weakref.ref, tuple[str, ...]]] = {}  # group id -> (owner, member names)
_step = threading.local()  # .rows: the RowAdapters of the compiled step this thread runs now (step_rows)


def _new_plan(owner: nn.Module, names: tuple[str, ...], mods: list[nn.Module], old: _Plan | None) -> _Plan:
    plan = _plan(mods, old)
    ids = owner.__dict__.setdefault("_group_ids", {})
    if names not in ids:
        ids[names] = next(_group_ids)
        gid = ids[names]
        _groups[gid] = (weakref.ref(owner, lambda _, gid=gid: _groups.pop(gid, None)), names)  # pruned with owner
    plan.group = ids[names]
    return plan


def _split(m: nn.Module) -> tuple[nn.Module, LoRALinear | None]:
    return (m.base, m) if isinstance(m, LoRALinear) else (m, None)


def _key(mods: list[nn.Module]) -> tuple:
    return tuple((id(m), getattr(m, "version", 0)) for m in mods)


def _stack_base(bases: list[nn.Module]) -> qkernels.PackedWeight | None:
    """The members' weights in one kernel form, built from their blocks (the members never make their own)."""
    if not all(isinstance(b, QuantLinear) and b.use_kernels for b in bases):
        return None
    if len(bases) == 1:
        return bases[0].kernel_weight()
    in_f = bases[0].in_features
    if len({b.qtype for b in bases}) == 1:
        form = qkernels.ggml_form if bases[0].use_ggml else qkernels.pack
        pw = form(torch.cat([b.qweight for b in bases]), bases[0].qtype, in_f)
    elif bases[0].use_ggml or any(qkernels.kind(b.qtype, in_f) != "bf16" for b in bases):
        return None  # mixed int4 / other types: each base runs on its own
    else:
        pw = _cat_bf16(bases)
    return qkernels.with_blocks(pw, lambda x: torch.cat([b.matmul_sliced(x) for b in bases], -1))


def _cat_bf16(bases: list[nn.Module]) -> qkernels.PackedWeight:
    """The members' dequantized weights in one bf16 copy (rows member by member)."""
    return qkernels.bf16_form(torch.cat([b.weight_float(torch.bfloat16) for b in bases]))


def _stack_bf16(bases: list[nn.Module], stacked: qkernels.PackedWeight | None) -> qkernels.PackedWeight | None:
    """The members' bf16 copies stacked, when they use one for many rows (the "bf16" weights mode)."""
    if stacked is None or not bases[0].use_bf16_copy:
        return None
    if stacked.kind == "bf16":
        return qkernels.copy_only(stacked)
    return bases[0].bf16_weight() if len(bases) == 1 else _cat_bf16(bases)


def _base_matmul(plan: _Plan, x: Tensor) -> Tensor | None:
    """x through the stacked base weight in the form the members would pick for x, or None (no stacked form)."""
    if plan.base is None:
        return None
    form = plan.bases[0].kernel_form(x)
    if form is None:
        return None
    y = qkernels.matmul(x, plan.base16 if form == "bf16" else plan.base)
    return y if plan.bias is None else y + plan.bias.to(y.dtype)


def _plan(mods: list[nn.Module], old: _Plan | None = None) -> _Plan:
    """old: the plan this one replaces; its stacked base is reused when the bases are the same (an adapter change
    must not repack the base weights: measured ~50 ms a q/k/v stack of SmolLM2, 3 s for a whole set_adapters)."""
    bases, loras = zip(*(_split(m) for m in mods))
    sizes = [int(b.out_features) for b in bases]
    same = old is not None and len(old.bases) == len(bases) and all(a is b for a, b in zip(old.bases, bases))
    stacked = old.base if same else _stack_base(list(bases))
    stacked16 = old.base16 if same else _stack_bf16(list(bases), stacked)
    bias = None
    if stacked is not None and any(b.bias is not None for b in bases):
        bias = torch.cat([b.bias.float() if b.bias is not None else torch.zeros(n, device=b.qweight.device)
                          for b, n in zip(bases, sizes)])
    trainable = any(p.requires_grad for l in loras if l is not None
                    for p in list(l.lora_a.values()) + list(l.lora_b.values()))
    # DoRA scales the base's output rows too: its members add their own adapters (correct, not the fast path)
    trainable = trainable or any(l is not None and l.row_scale is not None for l in loras)
    flat, a_shape, cols = None, (0, 0), []
    factors = [] if trainable else [(j, a.detach().float(), b.detach().float() * s)
                                    for j, lora in enumerate(loras) if lora is not None for a, b, s in lora._fast]
    if factors:
        a_shape = (sum(a.shape[0] for _, a, _ in factors), factors[0][1].shape[1])
        offset, r_off = a_shape[0] * a_shape[1], 0
        for j, _, b in factors:
            out, r = b.shape
            cols.append((j, r_off, offset, out, r))
            offset, r_off = offset + out * r, r_off + r
        flat = torch.cat([a.reshape(-1) for _, a, _ in factors] + [b.reshape(-1) for _, _, b in factors])
    # eager steps use these views as they are: slicing them anew costs ~2 us a factor, every step
    views = _factor_views(flat, a_shape, cols) if flat is not None else (None, [])
    return _Plan(_key(mods), sizes, list(bases), stacked, stacked16, bias, flat, a_shape, cols, views, trainable)


def _factor_views(lora: Tensor, a_shape: tuple[int, int], b_parts: list) -> tuple[Tensor, list[Tensor]]:
    """A_stack [R, in] and each s * B [out_j, r], as views of a plan's flat lora tensor."""
    n_rows, in_f = a_shape
    return (lora[:n_rows * in_f].view(n_rows, in_f),
            [lora[offset:offset + out * r].view(out, r) for _, _, offset, out, r in b_parts])


def _row_lora(plan: _Plan, mods: list[nn.Module], names: tuple[str, ...], used: tuple[int, ...]) -> _RowLora | None:
    """The plan's row form over the adapters `used` (indices into names): those some row uses, so the A product
    computes no columns that every row would zero."""
    key = (names, tuple((id(m), getattr(m, "layout", 0)) for m in mods))
    forms = plan.__dict__.setdefault("_row_forms", {})
    hit = forms.get(used)
    if hit is not None and hit[0] == key:
        return hit[1]
    parts, a_list, b_list, cols = [], [], [], []
    for j, m in enumerate(mods):
        if not isinstance(m, LoRALinear):
            continue
        bs, c0 = [], len(cols)
        for i, n in enumerate(names):
            if n in m._keys and i in used:
                a, b = m.pair(n)
                a_list.append(a.detach().float())
                bs.append(b.detach().float() * m.alpha_scale[n])
                cols += [i] * a.shape[0]
        if bs:  # h's columns of one member are side by side: one product adds all its adapters
            parts.append((j, c0, len(cols) - c0))
            b_list.append(torch.cat(bs, 1))
    rl = None
    if parts:
        rl = _RowLora(key, torch.cat(a_list), parts, b_list,
                      torch.tensor(cols, dtype=torch.long, device=a_list[0].device))
    if len(forms) > 32:  # sets of adapters in use come and go with the batch
        forms.clear()
    forms[used] = (key, rl)
    return rl


def _row_forward(plan: _Plan, mods: list[nn.Module], x: Tensor, rows: RowAdapters) -> list[Tensor]:
    """Each row's own adapters over the shared base product (x [B, T, in]; rows.scales [B, n])."""
    y = _base_matmul(plan, x)
    lora = rows.any and any(isinstance(m, LoRALinear) for m in mods)
    if lora and torch.compiler.is_compiling():
        if y is None:
            y = torch.cat([b(x) for b in plan.bases], dim=-1)
        return list(torch.ops.toolkit.row_adapters(x, y, plan.group).split(plan.sizes, dim=-1))
    outs = [b(x) for b in plan.bases] if y is None else list(y.split(plan.sizes, dim=-1))
    if lora:
        _add_row_adapters(_row_terms(plan, mods, rows), x, outs)
    return outs


_RowTerms = tuple[Tensor, Tensor, list[tuple[int, int, int, Tensor]]]


def _row_terms(plan: _Plan, mods: list[nn.Module], rows: RowAdapters) -> _RowTerms | None:
    """What adding rows' adapters to plan's outputs takes, kept on `rows` for its next steps: A_all.T [in, R] of
    the adapters some row uses, S [B, 1, R] (each row's scale of each column of h) and, per member with adapters,
    (member, its columns c0:c1 of h, (s B).T [R_j, out_j]). None: no member has any of them."""
    cache = rows.__dict__.setdefault("_terms", {})
    hit = cache.get(id(plan))
    if hit is None or hit[0] is not plan:  # (the plan is kept alive with its terms: its id is not reused)
        rl = _row_lora(plan, mods, rows.names, rows.used)
        terms = None if rl is None else (
            rl.a.t(), rows.scales.index_select(1, rl.col_adapter)[:, None, :],
            [(j, c0, c0 + r, b.t()) for (j, c0, r), b in zip(rl.parts, rl.b)])
        hit = cache[id(plan)] = (plan, terms)
    return hit[1]


def _add_row_adapters(terms: _RowTerms | None, x: Tensor, outs: list[Tensor]) -> None:
    """outs[j] += each row's adapters of member j, in place. Library GEMMs: over 2+ rows they reuse each factor
    across the rows (inductor's loops over every adapter's columns measured 1.2-1.7x slower at 16 rows)."""
    if terms is None:
        return
    a_t, s, parts = terms
    h = torch.matmul(x.to(a_t.dtype), a_t).mul_(s)  # [B, T, R]: each row's h at its own scales
    for j, c0, c1, b_t in parts:
        if outs[j].dtype == b_t.dtype:  # one op: y_j += h_j @ (s B).T
            outs[j].view(-1, b_t.shape[1]).addmm_(h[..., c0:c1].reshape(-1, c1 - c0), b_t)
        else:
            outs[j] += torch.matmul(h[..., c0:c1], b_t).to(outs[j].dtype)


@torch.library.custom_op("toolkit::row_adapters", mutates_args=())
def _row_adapters_op(x: Tensor, y: Tensor, group: int) -> Tensor:
    """y (group `group`'s stacked base output for x) plus each row's adapters of the compiled step now running, as
    the eager step computes them: one opaque call in the compiled graph."""
    ref, names = _groups[group]
    owner = ref()
    plan = owner.__dict__["_group_plans"][names]
    terms = _row_terms(plan, [getattr(owner, n) for n in names], getattr(_step, "rows", None))
    out = y.clone()
    _add_row_adapters(terms, x, list(out.split(plan.sizes, dim=-1)))
    return out


@_row_adapters_op.register_fake
def _(x: Tensor, y: Tensor, group: int) -> Tensor:
    return torch.empty_like(y)


@contextlib.contextmanager
def step_rows(rows: RowAdapters | None):
    """Hand a compiled step's per-row adapters to its row_adapters ops (Decoder.step wraps each call)."""
    old, _step.rows = getattr(_step, "rows", None), rows
    try:
        yield
    finally:
        _step.rows = old


def group_forward(owner: nn.Module, names: tuple[str, ...], x: Tensor,
                  rows: RowAdapters | None = None) -> list[Tensor]:
    """The outputs of owner's linears `names` for input x (inference; training runs them one by one).
    rows: a batched step's per-row adapter sets, which replace the model's active set for this call."""
    mods = [getattr(owner, n) for n in names]
    if torch.is_grad_enabled() and (x.requires_grad or owner.training):
        return [m(x) for m in mods]
    plans = owner.__dict__.setdefault("_group_plans", {})
    plan = plans.get(names)
    if torch.compiler.is_compiling():
        pass  # the eager caller has refreshed the plans (refresh_plans): checking here would guard on versions
    elif plan is None or plan.key != _key(mods):
        plan = plans[names] = _new_plan(owner, names, mods, plan)
    if rows is not None and not plan.per_module_lora:
        return _row_forward(plan, mods, x, rows)
    y = _base_matmul(plan, x)
    # (b_parts, not plan.lora, says whether there are adapters: a compiled step reading plan.lora would guard it)
    if y is None and (not plan.b_parts or plan.per_module_lora):
        return [m(x) for m in mods]  # nothing to share
    if y is None:
        y = torch.cat([b(x) for b in plan.bases], dim=-1)
    outs = list(y.split(plan.sizes, dim=-1))  # views of y
    if plan.per_module_lora:
        return [m.add_adapters(o, x) if isinstance(m, LoRALinear) else o for m, o in zip(mods, outs)]
    if not plan.b_parts:
        return outs
    compiling = torch.compiler.is_compiling()
    if compiling:  # sliced in the graph from the one arena every plan shares (pack_plans): one tensor guard a step
        lora = owner.__dict__["_lora_arena"][plan.arena_span[0]:plan.arena_span[1]]
        a_stack, b_scaled = _factor_views(lora, plan.a_shape, plan.b_parts)
        a_stack, b_scaled = a_stack.float(), [b.float() for b in b_scaled]  # (fused into the loops that read them)
    else:
        a_stack, b_scaled = plan.views
    h = thin_linear(x.to(a_stack.dtype), a_stack)  # [..., R]: every adapter of every member at once
    for (j, c0, _, _, r), bs in zip(plan.b_parts, b_scaled):  # each member adds its adapters' s * B (no zeros read)
        part = h[..., c0:c0 + r]  # [..., r]
        if compiling:  # out of place: an in-place add into y's rows compiles to a masked
            outs[j] = outs[j] + thin_linear(part, bs).to(y.dtype)  # scatter over all of y
        elif y.dtype == bs.dtype:
            outs[j].view(-1, bs.shape[0]).addmm_(part.reshape(-1, part.shape[-1]), bs.t())
        else:
            outs[j] += F.linear(part, bs).to(y.dtype)
    return outs


def pack_plans(owners: list[nn.Module], compute_dtype: torch.dtype = torch.float32) -> None:
    """Before a compiled step, which reads the plans as they are: rebuild the plans whose members or adapters
    changed, then copy every plan's A/B into one arena that all owners share. A compiled step checks a guard for
    each tensor it reads, even when skipping the rest, and one shared tensor is read once.

    The arena is float16 where the adapters' outputs add to bases that round their input to bfloat16 anyway (the
    CPU kernel forms, or a half compute dtype): the step then reads half the adapter bytes (measured: ~0.25 ms a
    token less with an r=16 adapter on every linear of SmolLM2-135M), and float16's rounding of A and s * B (2^-11)
    is well below the base's. Otherwise it is float32 and the plans' own copies become views of it."""
    plans = []
    for owner in owners:
        own = owner.__dict__.get("_group_plans", {})
        for names, plan in own.items():
            mods = [getattr(owner, n) for n in names]
            if plan.key != _key(mods):
                plan = own[names] = _new_plan(owner, names, mods, plan)
            if plan.lora is not None:
                plans.append(plan)
    half = compute_dtype in (torch.float16, torch.bfloat16) or all(p.base is not None for p in plans)
    arena = torch.cat([p.lora for p in plans]).to(torch.float16 if half else torch.float32) if plans else None
    if arena is not None:  # compiled with dynamic=True, a rank would be a symbol: inductor's loops over it then run
        # masked tails and no unrolling (measured: 2-3x the adapter's time). New scales keep the shape: no recompile
        torch._dynamo.mark_static(arena)
    offset = 0
    for plan in plans:
        n = plan.lora.numel()
        plan.arena_span = (offset, offset + n)
        if not half:  # eager steps keep reading float32: one copy serves both
            plan.lora = arena[offset:offset + n]
            plan.views = _factor_views(plan.lora, plan.a_shape, plan.b_parts)
        offset += n
    for owner in owners:
        owner.__dict__["_lora_arena"] = arena


def drop_plans(owner: nn.Module) -> None:
    owner.__dict__.pop("_group_plans", None)
    owner.__dict__.pop("_lora_arena", None)


def drop_weight_forms(model: nn.Module) -> None:
    """Forget every weight form made from the packed blocks (kernel weights, bf16 and float copies, group plans):
    they are made again, lazily, under the switches now in force."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.drop_cache()
        drop_plans(m)
