"""Adapter members: PEFT LoRA finetunes of one base model, the base weights loaded once, run in one forward.

Users hold their specialists as LoRA adapters of a general model. A member-set entry names the base (``path``)
and an ``adapter`` (a local folder or hub id, as ``PeftModel.from_pretrained`` takes it); every member on the same
base (and a member that *is* that base, without an adapter) shares one copy of the base weights, with each
adapter's LoRA matrices injected by PEFT beside them.

One forward serves several of those members: the caller repeats its rows once per member (``blocks``, member-
major: rows ``[k*B, (k+1)*B)`` are member ``k``'s) and every LoRA layer adds each block's own low-rank update,
all blocks' products in two batched multiplies (as S-LoRA and Punica group them) instead of one pass per adapter.
The base weights are read once per step for all members, which is what makes a routed step over ``K`` adapter
members cost about one base step on hardware where a small batch costs what one row costs.

Supported: plain LoRA on ``nn.Linear`` layers (any ranks, ``alpha``, rsLoRA, rank/alpha patterns). An adapter
that changes the shared base itself or needs another computation (DoRA and other variants, LoRA on embeddings or
the LM head, ``modules_to_save``, trained biases) is refused, naming the member and the feature: merge it into
its base (``merge_and_unload``) and use the merged folder as an ordinary member.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from salm.members import MemberError, ModelInfo, load_member_model, resolve_adapter_path

BASE = None
"""The block name of a member that is the base itself (no adapter)."""


def _peft():
    try:
        import peft
    except ImportError:
        raise MemberError('adapter members need PEFT: pip install -e ".[adapters]" (or pip install peft)') from None
    return peft


def check_adapter_config(member_id: str, adapter: str, config: Any) -> None:
    """Refuse (naming the member and the feature) an adapter saLM cannot share a base with."""

    def refuse(what: str) -> MemberError:
        return MemberError(
            f"member {member_id!r}: adapter {adapter} uses {what}, which adapter members do not support; merge it "
            "into its base (PeftModel.merge_and_unload, then save_pretrained) and use that folder as a member"
        )

    kind = str(getattr(config, "peft_type", ""))
    if kind.split(".")[-1].upper() != "LORA":
        raise refuse(f"PEFT type {kind or 'unknown'} (only LoRA is supported)")
    if getattr(config, "use_dora", False):
        raise refuse("DoRA (use_dora)")
    if getattr(config, "modules_to_save", None):
        raise refuse(f"modules_to_save {list(config.modules_to_save)}")
    if getattr(config, "bias", "none") != "none" or getattr(config, "lora_bias", False):
        raise refuse(f"trained biases (bias={config.bias!r}, lora_bias={getattr(config, 'lora_bias', False)})")
    for field in ("layer_replication", "trainable_token_indices", "target_parameters"):
        if getattr(config, field, None):
            raise refuse(field)


class LoraBank:
    """The LoRA layers PEFT injected into one base, and which adapter each block of rows runs.

    Every injected layer's ``forward`` is replaced by :meth:`_forward`, which reads :attr:`layout` (one adapter
    name, or :data:`BASE`, per block of rows) set by :meth:`blocks` around a forward. A lock makes the layout
    private to one forward at a time, so threads sharing the ensemble (a server, a training loop) cannot mix
    layouts; the default layout is the base alone.
    """

    def __init__(self, base: nn.Module, adapters: Sequence[str]):
        from peft.tuners.lora.layer import Linear as LoraLinear

        self.adapters = tuple(adapters)
        self.layout: tuple[str | None, ...] = (BASE,)
        self._lock = threading.RLock()
        self._stacks: dict[int, tuple[tuple[str, ...], torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._half: dict[tuple[Any, ...], torch.Tensor] = {}
        self.layers = []
        for name, module in base.named_modules():
            if isinstance(module, LoraLinear):
                module.forward = self._bound(module)  # an instance attribute: this layer only
                self._stack(module)
                self.layers.append(module)
                module.salm_name = name

    @contextlib.contextmanager
    def blocks(self, layout: Sequence[str | None]) -> Iterator[None]:
        """Run the base inside this block with rows in ``len(layout)`` equal blocks, block ``k`` with adapter
        ``layout[k]`` (:data:`BASE`: none)."""
        with self._lock:
            old, self.layout = self.layout, tuple(layout)
            try:
                yield
            finally:
                self.layout = old

    def _bound(self, layer: nn.Module):
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self._forward(layer, x, *args, **kwargs)

        return forward

    def _forward(self, layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base_layer(x)`` plus, for every block of rows, its adapter's ``B(A(x)) * scaling`` (PEFT's formula)."""
        result = layer.base_layer(x, *args, **kwargs)
        names = [n if n in layer.lora_A else BASE for n in self.layout]  # an adapter may skip this layer
        if all(n is BASE for n in names):
            return result
        dtype = result.dtype
        if len(names) == 1 and dtype == layer.lora_A[names[0]].weight.dtype:
            n = names[0]  # one block at the adapter's precision: exactly PEFT's own forward of one active adapter
            a = layer.lora_A[n]
            return (result + layer.lora_B[n](a(x.to(a.weight.dtype))) * layer.scaling[n]).to(dtype)
        blocks = len(names)
        live = [k for k, n in enumerate(names) if n is not BASE]
        used = tuple(names[k] for k in live)
        a, b, s = self._stacked(layer, used)  # [n, r, in], [n, out, r], [n]
        xs = x.reshape(blocks, -1, x.shape[-1])
        out = result.reshape(blocks, -1, result.shape[-1])
        if len(live) < blocks:
            xs, rest = xs[live], out
            out = out[live]
        h = torch.bmm(xs.to(a.dtype), a.transpose(1, 2))  # [n, rows, r]: small
        if dtype == a.dtype:  # PEFT's arithmetic, block by block
            out = out + torch.bmm(h, b.transpose(1, 2)) * s[:, None, None]
        else:  # a half-precision base: the update is added inside the GEMM, in the base's dtype (see _half_b)
            h = (h * s[:, None, None]).to(dtype)
            out = torch.baddbmm(out, h, self._half_b(layer, used, b, dtype).transpose(1, 2))
        if len(live) < blocks:
            rest = rest.clone()
            rest[live] = out
            out = rest
        return out.reshape(result.shape)

    def _stack(self, layer: Any) -> None:
        """Every adapter's A and B of ``layer`` in one tensor each (ranks zero-padded to the largest, which leaves
        the products unchanged), with PEFT's own weights made views into them: the matrices are held once."""
        names = tuple(n for n in self.adapters if n in layer.lora_A)
        a_w = [layer.lora_A[n].weight for n in names]
        b_w = [layer.lora_B[n].weight for n in names]
        r = max(w.shape[0] for w in a_w)
        a = a_w[0].new_zeros(len(names), r, a_w[0].shape[1])
        b = b_w[0].new_zeros(len(names), b_w[0].shape[0], r)
        with torch.no_grad():
            for k, (wa, wb) in enumerate(zip(a_w, b_w)):
                a[k, : wa.shape[0]] = wa
                b[k, :, : wb.shape[1]] = wb
                wa.data = a[k, : wa.shape[0]]
                wb.data = b[k, :, : wb.shape[1]]
        s = torch.tensor([float(layer.scaling[n]) for n in names], dtype=a.dtype, device=a.device)
        self._stacks[id(layer)] = (names, a, b, s)

    def _half_b(self, layer: Any, names: tuple[str, ...], b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``b`` (the stacked B matrices) in the base's half-precision ``dtype``, cast once per layer and adapter
        subset. PEFT keeps adapters in fp32 over a bf16 base and adds an fp32 update to the bf16 output, then
        rounds: three passes over a [rows, out] fp32 tensor. For a prefill that dominates: 4 blocks x 900 rows
        through an 896 -> 4,864 layer on this CPU, the base's linear took 0.20 s, PEFT's fp32 sum 0.90 s more. One
        GEMM that adds the update in the base's dtype (``baddbmm``) reads and writes the output once: 0.18-0.25 s
        more. It differs from PEFT's sum by the rounding of the (small) update to bf16 (tested)."""
        key = (id(layer), names, dtype)
        cached = self._half.get(key)
        if cached is None:
            cached = self._half[key] = b.to(dtype)
        return cached

    def _stacked(self, layer: Any, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stacked A, B and scalings of adapters ``names`` (all of this layer's, in order: no copy)."""
        order, a, b, s = self._stacks[id(layer)]
        if names == order:
            return a, b, s
        index = torch.tensor([order.index(n) for n in names], device=a.device)
        return a.index_select(0, index), b.index_select(0, index), s.index_select(0, index)


def load_adapters(base: nn.Module, members: Sequence[Any], trust_remote_code: bool = False) -> LoraBank:
    """Inject the LoRA adapters of ``members`` (ModelInfos with ``adapter``; the adapter name is the member id)
    into ``base`` and return the bank running them; every problem is a one-line MemberError naming the member."""
    peft = _peft()
    model = None
    for info in members:
        where = resolve_adapter_path(info)
        try:
            config = peft.PeftConfig.from_pretrained(where, revision=info.adapter_revision)
        except Exception as e:  # noqa: BLE001 - missing folder, not an adapter, hub errors: one line each
            raise MemberError(f"member {info.id!r}: cannot read the adapter {info.adapter}: {_first_line(e)}") from None
        check_adapter_config(info.id, info.adapter, config)
        try:
            if model is None:
                model = peft.PeftModel.from_pretrained(
                    base, where, adapter_name=info.id, revision=info.adapter_revision, is_trainable=False,
                    low_cpu_mem_usage=True,  # no throw-away random init of the LoRA matrices before loading them
                )  # fmt: skip
            else:
                model.load_adapter(
                    where, adapter_name=info.id, revision=info.adapter_revision, is_trainable=False,
                    low_cpu_mem_usage=True,
                )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - shape mismatches (an adapter of another base) and friends
            raise MemberError(
                f"member {info.id!r}: adapter {info.adapter} does not fit its base {info.path}: {_first_line(e)}"
            ) from None
    _check_layers(base, members)
    base.requires_grad_(False)
    return LoraBank(base, [m.id for m in members])


def _check_layers(base: nn.Module, members: Sequence[Any]) -> None:
    """Every injected layer must be a plain LoRA Linear outside the LM head (what :class:`LoraBank` runs)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer

    head = base.get_output_embeddings()
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for mid in module.lora_A.keys():
            what = None
            if not isinstance(module, LoraLinear):
                what = f"LoRA on {type(module.base_layer).__name__} layer {name}"
            elif module is head or getattr(module, "base_layer", None) is head:
                what = f"LoRA on the LM head ({name})"
            elif mid in getattr(module, "lora_variant", {}):
                what = f"the LoRA variant {type(module.lora_variant[mid]).__name__} on {name}"
            elif module.lora_B[mid].bias is not None:
                what = f"a LoRA bias on {name}"
            if what:
                info = next(m for m in members if m.id == mid)
                raise MemberError(
                    f"member {mid!r}: adapter {info.adapter} uses {what}, which adapter members do not support; "
                    "merge it into its base (PeftModel.merge_and_unload) and use that folder as a member"
                )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def base_groups(infos: Sequence[ModelInfo], device: str | torch.device) -> list[list[int]]:
    """Members that share one loaded model, as lists of indices in member order: those on the same base
    (``path``, ``revision``, device) when any of them has an adapter; every other member alone."""
    groups: dict[Any, list[int]] = {}
    for i, m in enumerate(infos):
        key = (m.path, m.revision, str(m.device or device))
        groups.setdefault(key, []).append(i)
    out: list[list[int]] = []
    for members in groups.values():
        if any(infos[i].adapter for i in members):
            out.append(members)
        else:
            out += [[i] for i in members]
    return sorted(out)


def load_member_models(
    infos: Sequence[ModelInfo], device: str | torch.device, dtype: torch.dtype, trust_remote_code: bool = False
) -> list[Any]:
    """One frozen model per member, in order; members on one base (:func:`base_groups`) get the same object,
    loaded once, with their LoRA adapters injected (:func:`salm.adapters.load_adapters`)."""
    models: list[Any] = [None] * len(infos)
    for group in base_groups(infos, device):
        first = infos[group[0]]
        adapted = [infos[i] for i in group if infos[i].adapter]
        model = load_member_model(first, first.device or device, dtype, trust_remote_code, pack=not adapted)
        if adapted:
            model.salm_lora = load_adapters(model, adapted, trust_remote_code)
            model.eval()
            # Packed once PEFT has wrapped the layers (the LoRA matrices stay dense: the grouped multiply reads
            # them). The checkpoint's pages that packing reads are handed back (salm.cpu.release_file_pages):
            # 1.23x (base + adapters) packed as unpacked, and a long prefill about twice as fast.
            from salm.cpu import pack_if_worthwhile

            pack_if_worthwhile(model, device)
        for i in group:
            models[i] = model
    return models
