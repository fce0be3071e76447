"""MultiModelWithScalarHeads: frozen members, one trained scalar head each, routing per token.

Only the heads are parameters of this module (``state_dict()``/``parameters()``/``save_pretrained``);
the members are held outside the module tree so they are never trained, saved or moved by accident.
The heads are described by one :class:`salm.heads.HeadConfig` (``model.head_config``), written to
``salm_config.json`` by ``save_pretrained`` and read back by ``from_pretrained``, which also reads the flat
``head_*`` keys of folders saved before it existed and the seed's bare ``.pt`` heads.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from salm import __version__
from salm.adapters import load_member_models
from salm.confidence import RouterState, history_over, read_mask
from salm.generation import FROM_CONFIG
from salm.io import atomic_dir, atomic_write_json
from salm.member_forward import MemberForward, MemberOutputs  # noqa: F401 - MemberOutputs: its old home
from salm.members import (
    MODELS,
    MemberError,
    ModelInfo,
    check_tokenizers,
    context_length,
    eos_token_ids,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_models,
)
from salm.routers import HeadConfig, HeadConfigError, router_class
from salm.weights import (  # noqa: F401 - CONFIG_NAME ... read_weights are also imported from here, their old home
    CONFIG_NAME,
    SEED_WEIGHTS_NAME,
    WEIGHTS_NAME,
    RoutingError,
    WeightsError,
    canonical_state,
    config_heads,
    config_members,
    head_state_problems,
    heads_of_state,
    read_config,
    read_weights,
)

if TYPE_CHECKING:
    from salm.generation import DecodeConfig, TokenDecision


@dataclass
class EnsembleOutput:
    router_logits: torch.Tensor  # [B, L, M]; position t routes the prediction of token t+1
    gold_logprobs: torch.Tensor | None = None  # [B, L, M] log p_m(labels[t+1]) (0 where masked)
    loss_mask: torch.Tensor | None = None  # [B, L] bool: positions whose next token is a label
    logprobs: torch.Tensor | None = None  # [B, L, M, V] when no labels are given
    hidden_states: list[torch.Tensor] | None = None

    @property
    def routing_probs(self) -> torch.Tensor:
        return torch.softmax(self.router_logits, dim=-1)


class MultiModelWithScalarHeads(MemberForward, nn.Module):
    """An ensemble of frozen causal LMs sharing one tokenizer, routed per token by scalar heads."""

    def __init__(
        self,
        base_models: Sequence[ModelInfo] | str | os.PathLike | None = MODELS,
        head_hidden_dim: int | None = None,
        head_dropout: float | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        head_config: HeadConfig | None = None,
        head_norm: str | None = None,
        router: str | None = None,
        members: Sequence[nn.Module] | None = None,
        tokenizer: Any = None,
        trust_remote_code: bool = False,
    ):
        """Load (or adopt, via ``members=``/``tokenizer=``) the members and build one head per member.

        ``head_config`` describes the heads (:class:`HeadConfig`'s defaults when not given). The seed's
        keywords ``head_hidden_dim``/``head_dropout`` (positions 2 and 3, as in the seed) and ``head_norm``/
        ``router`` override single fields of it; they carry no defaults of their own.
        ``device`` places the heads and every member without its own ``ModelInfo.device``; ``dtype``
        is the members' dtype (``"auto"`` or None: bf16 on accelerators and on CPUs that multiply it
        natively, else fp32). Heads stay fp32.
        """
        super().__init__()
        self.head_config = _with_overrides(
            head_config or HeadConfig(), hidden_dim=head_hidden_dim, dropout=head_dropout, norm=head_norm, router=router
        )  # first of all: a bad head setting is named before anything loads
        self.device = resolve_device(device)  # a bad --device is named before any member loads
        infos = resolve_models(base_models)
        for m in infos:
            if m.device is not None:
                resolve_device(m.device, what=f"member {m.id!r}: device")
        self.dtype = resolve_dtype(dtype, self.device)
        self.infos = infos
        self.model_ids = [m.id for m in infos]
        if members is None:
            loaded: dict[tuple[str, str | None], Any] = {}  # members on one base read its tokenizer once
            for m in infos:
                if (m.path, m.revision) not in loaded:
                    loaded[(m.path, m.revision)] = load_tokenizer(m, trust_remote_code)
            tokenizers = [loaded[(m.path, m.revision)] for m in infos]
            check_tokenizers(tokenizers, infos)
            members = load_member_models(infos, self.device, self.dtype, trust_remote_code)
            tokenizer = tokenizers[0]
        else:
            if len(members) != len(infos):
                raise MemberError(f"got {len(members)} member models for {len(infos)} member infos")
            if tokenizer is None:
                raise MemberError("pass tokenizer= together with members=")
            for m in members:
                m.eval()
                m.requires_grad_(False)
        # A plain list keeps members out of state_dict(), parameters() and .to().
        self.__dict__["members"] = list(members)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.vocab_size = len(tokenizer)
        for info, model in zip(infos, self.members):
            n = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
            if n is not None and n < self.vocab_size:
                raise MemberError(
                    f"member {info.id!r} has {n} output rows but the shared tokenizer has {self.vocab_size} tokens"
                )
        self.eos_token_ids = eos_token_ids(self.members, tokenizer)
        self.hidden_sizes = [m.config.hidden_size for m in self.members]
        self.build_router(self.head_config.router)
        # Per member: its LoRA adapter's name in the base it shares (salm.adapters), None for a whole model.
        self.adapter_names = [m.id if m.adapter else None for m in infos]
        self._cache_kwarg = [
            "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values" for m in self.members
        ]

    def build_router(self, router: str) -> None:
        """(Re)create fresh heads of the registered router ``router`` (:func:`salm.routers.router_names`).

        The router object (``router_module``) is not a child of the ensemble: its children are, so the
        ensemble's ``state_dict`` keys are the ones saved since the seed (``projection_heads.<id>...``).
        """
        self.head_config = dataclasses.replace(self.head_config, router=router)  # checked like the constructor
        for name in self.__dict__.pop("_router_children", ()):
            delattr(self, name)
        module = router_class(router)(self.model_ids, self.hidden_sizes, self.head_config)
        children = [name for name, _ in module.named_children()]
        taken = [name for name in children if hasattr(self, name)]
        if taken:
            raise HeadConfigError(f"router {router!r}: its module names {taken} are taken by the ensemble")
        for name, child in module.named_children():
            self.add_module(name, child)
        self.__dict__["router_module"] = module
        self.__dict__["_router_children"] = children
        self.to(self.device)

    # The seed's and earlier saLM's names for the head settings: views of ``head_config``.
    @property
    def router(self) -> str:
        return self.head_config.router

    @property
    def head_hidden_dim(self) -> int:
        return self.head_config.hidden_dim

    @property
    def head_dropout(self) -> float:
        return self.head_config.dropout

    @head_dropout.setter
    def head_dropout(self, value: float) -> None:
        """Only records the rate (what ``save_pretrained`` writes); the Dropout modules keep theirs."""
        self.head_config = dataclasses.replace(self.head_config, dropout=value)

    @property
    def head_norm(self) -> str:
        return self.head_config.norm

    @property
    def uses_stats(self) -> bool:
        """Whether the router reads inputs besides the hidden states (generation computes them only then)."""
        return self.router_module.input_width(len(self.model_ids)) > 0

    @property
    def uses_history(self) -> bool:
        """Whether the router reads the members' record on the text so far (:class:`salm.confidence.History`)."""
        return self.router_module.reads_history

    @property
    def stats_width(self) -> int:
        """Router inputs per position besides the hidden states (0 for the seed's heads)."""
        return self.router_module.input_width(len(self.model_ids))

    def confidence_features(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor | None:
        """The router's inputs from stacked member logits ``[..., M, V]`` and the history features ``[..., 2M]``
        (:meth:`salm.routers.Router.inputs`), or None for a router that reads none.

        Generation's hook: the one place it turns the logits it already has into router input. The layout
        matches the feature cache's: history first, then the confidence statistics (see :meth:`member_features`).
        """
        return self.router_module.inputs(logits, history)

    def new_history(self, rows: int) -> RouterState:
        """The router's per-sequence state for ``rows`` sequences (a :class:`~salm.confidence.History` for the
        routers that read one; an empty :class:`~salm.confidence.RouterState` otherwise)."""
        return self.router_module.new_state(rows, self.device)

    # ------------------------------------------------------------------ members
    @property
    def common_tokenizer(self):  # the seed's name
        return self.tokenizer

    @property
    def context_length(self) -> int | None:
        """The smallest member context: no member may be asked to read beyond its own."""
        lengths = [n for n in (context_length(m) for m in self.members) if n]
        return min(lengths) if lengths else None

    # ------------------------------------------------------------------ heads
    def router_logits(self, hidden_states: Sequence[torch.Tensor], stats: torch.Tensor | None = None) -> torch.Tensor:
        """Per-member hidden states [..., H_m] (+ router inputs [..., F]) -> routing scores [..., M], by the router.

        ``stats`` (from :meth:`confidence_features`, or the feature cache's stored rows: history, then the
        confidence statistics) is required by routers that read inputs and ignored by the seed's heads.
        """
        hs = [h.to(self.device).detach() for h in hidden_states]
        if stats is not None:
            stats = stats.to(self.device).detach()
        return self.router_module(hs, stats)

    def check_routing(self, probs: torch.Tensor, where: str = "") -> None:
        """Raise :class:`RoutingError` if routing probabilities (or logits) hold NaN or infinity.

        Finite but huge head weights (a corrupt or adversarial file passes the load check) overflow inside the
        heads; a NaN routing silently picks member 0 (argmax) or emits nothing (mixture). Never answer on it.
        """
        if bool(torch.isfinite(probs).all()):
            return
        source = self.__dict__.get("weights_source")
        big = max(self.state_dict().items(), key=lambda kv: float(kv[1].abs().max()) if kv[1].numel() else 0.0)
        raise RoutingError(
            f"the routing heads produced non-finite routing probabilities{where}: the head weights "
            f"({source or 'untrained, in memory'}) overflow (largest |value| {float(big[1].abs().max()):.3g} "
            f"in {big[0]}); use other weights or retrain the heads"
        )

    def get_model_probs(self, all_raw_scores: torch.Tensor) -> torch.Tensor:
        """The seed's name: routing probabilities, the softmax of the router logits over members."""
        return torch.softmax(all_raw_scores, dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_hidden_states: bool = False,
    ) -> EnsembleOutput:
        """Router logits per position and, with ``labels``, each member's log-prob of the gold next token.

        ``labels`` follow Hugging Face's convention: aligned with ``input_ids``, -100 where ignored; the
        shift is done here, so position t carries log p_m(labels[t+1]). Without labels the full
        next-token log-probs [B, L, M, V] are returned (memory-hungry; meant for short inputs).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if labels is None:
            mo = self.member_outputs(input_ids, attention_mask)
            stacked = torch.stack(mo.logits, dim=2)  # [B, L, M, V]
            logprobs = F.log_softmax(stacked, dim=-1)
            history = None
            if self.router_module.reads_history:
                ids = input_ids.to(self.device)
                read = torch.zeros(*ids.shape, len(self.members), device=self.device)
                nxt = ids[:, 1:, None, None].expand(-1, -1, read.shape[-1], 1)
                read[:, 1:] = logprobs[:, :-1].gather(-1, nxt)[..., 0]
                history = history_over(read, read_mask(attention_mask.to(self.device)))
            out = EnsembleOutput(
                router_logits=self.router_logits(mo.hidden_states, self.confidence_features(stacked, history)),
                hidden_states=mo.hidden_states if return_hidden_states else None,
            )
            out.logprobs = logprobs
        else:
            hidden, gold, stats, mask = self.member_features(input_ids, attention_mask, labels)
            out = EnsembleOutput(
                router_logits=self.router_logits(hidden, stats), hidden_states=hidden if return_hidden_states else None
            )
            out.gold_logprobs, out.loss_mask = gold, mask
        self.check_routing(out.router_logits[attention_mask.to(self.device).bool()])
        return out

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        max_new_tokens: int = FROM_CONFIG,
        temperature: float = FROM_CONFIG,
        top_p: float = FROM_CONFIG,
        top_k: int = FROM_CONFIG,
        routing: str = FROM_CONFIG,
        return_decisions: bool = False,
        stop: str | Sequence[str] | None = FROM_CONFIG,
        seed: int | None = FROM_CONFIG,
        use_cache: bool = True,
        truncate: str | None = FROM_CONFIG,
        batch_size: int | None = None,
        streamer: Any = None,
        return_outputs: bool = False,
        progress: bool = False,
        cache_implementation: str = FROM_CONFIG,
        compile: bool = FROM_CONFIG,
        *,
        config: DecodeConfig | None = None,
        input_texts: str | Sequence[str] | None = None,
    ) -> Any:
        """Routed generation of one prompt (returns a string) or a list of prompts (a list, in order).

        Settings come from ``config`` (a :class:`salm.generation.DecodeConfig`; default: its defaults); each
        decoding argument given overrides it (the default, ``FROM_CONFIG``, keeps the config's value):
        ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``top_k``, ``routing`` (``argmax`` |
        ``mixture`` | ``threshold:<p>`` | ``member:<id>``), ``stop``, ``seed``, ``truncate``,
        ``cache_implementation``, ``compile``.
        ``return_decisions`` gives dicts with each token's member and routing probabilities,
        ``return_outputs`` :class:`salm.generation.GenerationOutput` objects; ``batch_size``, ``streamer``,
        ``use_cache`` and ``progress`` are :func:`salm.generation.generate`'s. ``input_texts`` is the seed's
        name for ``prompt``.
        """
        from salm.generation import generate

        if prompt is None:
            prompt = input_texts
        return generate(
            self, prompt, max_new_tokens, temperature, top_p, top_k, routing, return_decisions, stop, seed,
            use_cache, truncate, batch_size, streamer, return_outputs, progress, cache_implementation, compile,
            config=config,
        )  # fmt: skip

    def stream(
        self,
        prompt: str,
        *,
        config: DecodeConfig | None = None,
        max_new_tokens: int = FROM_CONFIG,
        temperature: float = FROM_CONFIG,
        top_p: float = FROM_CONFIG,
        top_k: int = FROM_CONFIG,
        routing: str = FROM_CONFIG,
        stop: str | Sequence[str] | None = FROM_CONFIG,
        seed: int | None = FROM_CONFIG,
        truncate: str | None = FROM_CONFIG,
        cache_implementation: str = FROM_CONFIG,
        compile: bool = FROM_CONFIG,
        use_cache: bool = True,
    ) -> Iterator[TokenDecision]:
        """Yield one prompt's generated tokens as they are made (each with its member and routing
        probabilities); the settings are :meth:`generate`'s. Leaving the loop early stops decoding."""
        from salm.streaming import stream

        return stream(
            self, prompt, config=config, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, routing=routing, stop=stop, seed=seed, truncate=truncate,
            cache_implementation=cache_implementation, compile=compile, use_cache=use_cache,
        )  # fmt: skip

    # ------------------------------------------------------------------ save / load
    def config_dict(self) -> dict[str, Any]:
        """What ``salm_config.json`` holds: the package version, the members and the :class:`HeadConfig`."""
        return {
            "salm_version": __version__,
            "members": [dict(m.to_dict(), hidden_size=h) for m, h in zip(self.infos, self.hidden_sizes)],
            "heads": self.head_config.to_dict(),
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write only the heads (safetensors) and a JSON config naming the members; never the members."""
        from safetensors.torch import save_file

        d = Path(save_directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_dir(d) as tmp:  # both files or neither: a kill never leaves heads without their config
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            atomic_write_json(tmp / CONFIG_NAME, self.config_dict())
        return d

    @classmethod
    def from_pretrained(
        cls,
        weights_path: str | os.PathLike | None = None,
        base_models: Sequence[ModelInfo] | str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> MultiModelWithScalarHeads:
        """Load trained heads: our folder (safetensors + config), a ``.safetensors`` file, or the seed's ``.pt``.

        Without ``base_models`` the members named in the folder's config are loaded (PEFT-style). The heads'
        :class:`HeadConfig` comes from the config; weights without one (``.pt``, a bare ``.safetensors``)
        tell their router, norm and width from their tensors. ``kwargs`` go to the constructor, so
        ``head_config=`` or a single ``head_*``/``router`` keyword overrides what was read. Weights whose
        member ids or shapes do not fit the members raise :class:`WeightsError` listing every mismatch.
        """
        if weights_path is None:
            raise WeightsError("from_pretrained needs weights_path (a saLM folder, .safetensors or .pt file)")
        state, config = read_weights(weights_path)
        if base_models is None:
            if config is not None:
                base_models = config_members(config)
            elif Path(weights_path).suffix != ".safetensors":
                base_models = MODELS  # the seed's .pt: its heads were trained on the default trio
            else:
                raise WeightsError(
                    f"{weights_path} has no {CONFIG_NAME} beside it naming its members; pass base_models "
                    "(--models) or use the folder save_pretrained wrote"
                )
        if config is not None:
            kwargs.setdefault("head_config", config_heads(config))
        else:
            state = canonical_state(state, resolve_models(base_models))
            kwargs.setdefault("head_config", heads_of_state(state))
        model = cls(base_models, **kwargs)
        model.load_heads(state, source=str(weights_path))
        model.eval()
        return model

    def load_heads(self, state: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Load head weights strictly: any missing, unexpected or mis-shaped tensor is an error."""
        state = canonical_state(state, self.infos)
        problems = head_state_problems(state, self.state_dict(), self.model_ids)
        if problems:
            raise WeightsError(f"head weights in {source} do not fit members {self.model_ids}: " + "; ".join(problems))
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # NaN heads route every token to member 0 and make mixture emit nothing: never load them
            raise WeightsError(
                f"head weights in {source} hold NaN or infinite values in {len(bad)} tensor(s) "
                f"{bad[:4]}{' ...' if len(bad) > 4 else ''}; they come from a diverged run and cannot route"
            )
        self.load_state_dict(state, strict=True)
        self.__dict__["weights_source"] = source

    def train(self, mode: bool = True):
        """Only heads ever train; members stay in eval mode (no dropout) whatever is asked."""
        super().train(mode)
        self.router_module.training = mode  # its children are ours (build_router); its own flag follows them
        for m in self.members:
            m.eval()
        return self


def _with_overrides(config: HeadConfig, **fields: Any) -> HeadConfig:
    """``config`` with the fields given (not None) replaced: the seed's keyword arguments over a HeadConfig."""
    if not isinstance(config, HeadConfig):
        raise HeadConfigError(f"head_config must be a salm.heads.HeadConfig, got {type(config).__name__}")
    given = {k: v for k, v in fields.items() if v is not None}
    return dataclasses.replace(config, **given) if given else config


def load_ensemble(
    models: Sequence[ModelInfo] | str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> MultiModelWithScalarHeads:
    """The ensemble of ``models`` (a member-set file, ModelInfos, or None: the default trio, or the members
    ``weights``' config names) with trained heads from ``weights``, or fresh heads (``kwargs``) without.

    The one loader every command and entry point calls, so none of them builds an ensemble its own way.
    """
    common = dict(device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    if weights:
        return MultiModelWithScalarHeads.from_pretrained(weights_path=weights, base_models=models, **common, **kwargs)
    return MultiModelWithScalarHeads(models, **common, **kwargs)
