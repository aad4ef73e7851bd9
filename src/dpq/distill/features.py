"""Distillation terms beyond the logit KD loss in :mod:`dpq.distill`, for comparing methods.

* Hidden-state transfer (FitNets, Romero et al. 2015; TinyBERT, Jiao et al. 2020): match student
  layer ``i``'s hidden states to a mapped teacher layer, through a learned linear projection
  when the widths differ. MSE or ``1 - cosine``.
* Attention transfer (MiniLM, Wang et al. 2020; TinyBERT matches the maps by MSE instead):
  KL(teacher attention row || student attention row), per head and query position.
* Relational KD (RKD, Park et al. 2019): match the batch's pairwise cosine-similarity matrices,
  which works across widths without a projection.
* Multi-teacher soft labels: a weighted average of several teachers' tempered distributions.

Neither Lightning nor transformers ship KD losses, so they are written here as pure functions
(plus one small module for the projection) that a LightningModule calls. The teacher side is
always treated as a constant target (detached) and computed in float32.

Inputs follow Hugging Face encoder outputs of ``model(..., output_hidden_states=True,
output_attentions=True)``: ``hidden_states`` is a tuple of L+1 tensors [B, T, d] (index 0 is
the embeddings, index i the output of layer i) and ``attentions`` a tuple of L tensors
[B, H, T, T] of attention probabilities. Layer maps hold 1-based layer indices.

Attention weights in transformers 5: only the eager attention implementation returns them.
With the default ``sdpa`` (or flash) implementation, ``output_attentions=True`` only logs a
warning and ``outputs.attentions`` is an EMPTY tuple. Build the models with
``BertConfig(..., attn_implementation="eager")``, ``from_pretrained(...,
attn_implementation="eager")``, or call ``model.set_attn_implementation("eager")`` on a built
model; :func:`feature_kd_loss` raises a ValueError saying so when attentions are missing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

HIDDEN_KINDS = ("mse", "cosine")
_EPS = 1e-12


# ---------------------------------------------------------------------------------------------
# Layer maps


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be an integer >= 1")
    return value


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer ``ceil(i * n_teacher / n_student)`` for student layers ``i = 1..n_student``.

    1-based indices into ``hidden_states``; the last student layer maps to the last teacher layer.
    """
    n_s = _check_count("n_student", n_student)
    n_t = _check_count("n_teacher", n_teacher)
    return [-(-i * n_t // n_s) for i in range(1, n_s + 1)]


def resolve_layer_map(layer_map: Sequence[int] | None, n_student: int, n_teacher: int) -> list[int]:
    """``None`` -> :func:`uniform_layer_map`; otherwise validate one teacher layer in 1..n_teacher per student layer."""
    if layer_map is None:
        return uniform_layer_map(n_student, n_teacher)
    n_s = _check_count("n_student", n_student)
    n_t = _check_count("n_teacher", n_teacher)
    layer_map = list(layer_map)
    if len(layer_map) != n_s:
        raise ValueError(
            f"layer_map={layer_map}: has {len(layer_map)} entries, needs one per student layer ({n_s})"
        )
    for i, j in enumerate(layer_map, start=1):
        if isinstance(j, bool) or not isinstance(j, int) or not 1 <= j <= n_t:
            raise ValueError(
                f"layer_map[{i - 1}]={j!r} (student layer {i}): teacher layer must be an integer in 1..{n_t}"
            )
    return layer_map


# ---------------------------------------------------------------------------------------------
# Hidden states


class HiddenProjection(nn.Module):
    """Student -> teacher width projection, one ``nn.Linear`` per mapped student layer.

    Only created when the widths differ; with equal widths it is the identity and has no
    parameters (``.needed`` is False). Add it to the student's optimizer: it is trained with
    the student and dropped afterwards.
    """

    def __init__(self, student_dim: int, teacher_dim: int, n_layers: int):
        super().__init__()
        self.student_dim = _check_count("student_dim", student_dim)
        self.teacher_dim = _check_count("teacher_dim", teacher_dim)
        self.n_layers = _check_count("n_layers", n_layers)
        self.needed: bool = student_dim != teacher_dim
        self.proj = (
            nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in range(n_layers))
            if self.needed
            else None
        )

    def forward(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """Project ``h`` [..., student_dim], the hidden state of student layer ``i`` (1-based)."""
        if h.shape[-1] != self.student_dim:
            raise ValueError(f"hidden width {h.shape[-1]} != student_dim={self.student_dim}")
        if not 1 <= i <= self.n_layers:
            raise ValueError(f"layer index i={i}: must be in 1..{self.n_layers}")
        if self.proj is None:
            return h
        return self.proj[i - 1](h)

    def extra_repr(self) -> str:
        return f"{self.student_dim} -> {self.teacher_dim}, n_layers={self.n_layers}, needed={self.needed}"


def _token_mask(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """attention_mask [B, T] as float on ``like``'s device, checked against ``like`` [B, T, ...]."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(like.shape[:2]):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != [B, T] = {tuple(like.shape[:2])}"
        )
    return attention_mask.to(device=like.device, dtype=torch.float32)


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``per_token`` [B, T] over real tokens (all tokens without a mask)."""
    if mask is None:
        return per_token.mean()
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def hidden_state_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    layer_map: Sequence[int] | None,
    kind: str = "mse",
    projection: HiddenProjection | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Average over mapped layers of MSE or ``1 - cosine`` between (projected) student and teacher hidden states.

    MSE is the mean over real tokens and features; cosine is per token, averaged over real
    tokens. ``layer_map`` (None = uniform) maps student layer i (1-based) to a teacher layer.
    """
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {HIDDEN_KINDS}")
    if len(student_hidden) < 2 or len(teacher_hidden) < 2:
        raise ValueError(
            "hidden_states must hold embeddings + at least one layer; "
            "call the models with output_hidden_states=True"
        )
    layer_map = resolve_layer_map(layer_map, len(student_hidden) - 1, len(teacher_hidden) - 1)
    mask = _token_mask(attention_mask, student_hidden[0])
    losses = []
    for i, j in enumerate(layer_map, start=1):
        s = student_hidden[i]
        if projection is not None:
            s = projection(s, i)
        s = s.float()
        t = teacher_hidden[j].detach().float()
        if s.shape != t.shape:
            raise ValueError(
                f"student layer {i} {tuple(s.shape)} vs teacher layer {j} {tuple(t.shape)}: shapes "
                f"differ; pass a HiddenProjection when the widths differ"
            )
        if kind == "mse":
            per_token = (s - t).pow(2).mean(dim=-1)
        else:
            per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
        losses.append(_masked_mean(per_token, mask))
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------
# Attention


def attention_dropouts(model: nn.Module) -> list[nn.Dropout]:
    """The dropout layers on a transformer's attention probabilities (``BertSelfAttention.dropout``,
    DistilBERT's ``MultiHeadSelfAttention.dropout``, ...). Eager attention returns the maps AFTER this
    dropout: in training, a student's rows then do not sum to 1 (dropped entries 0, the rest scaled by
    1/(1-p)) and the attention KL stays far from 0 even for a student equal to its teacher; the stage
    sets their ``p`` to 0 while it transfers attention (:class:`dpq.distill.module.DistillModule`)."""
    return [
        m.dropout
        for m in model.modules()
        if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "dropout", None), nn.Dropout)
    ]


def attention_loss(
    student_attn: Sequence[torch.Tensor],
    teacher_attn: Sequence[torch.Tensor],
    layer_map: Sequence[int] | None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher attention row || student attention row), as MiniLM (TinyBERT takes the MSE of the maps).

    Averaged over mapped layers, heads and real query positions. ``layer_map`` holds 1-based
    layer indices (as for hidden states; entry i-1 of the tuples is layer i). If the head counts
    differ, the head-averaged maps are compared (warned once per layer). Needs eager attention
    (see the module docstring).
    """
    if not student_attn or not teacher_attn:
        raise ValueError(
            "attentions are empty: call the models with output_attentions=True and eager attention "
            "(attn_implementation='eager' or model.set_attn_implementation('eager')); "
            "sdpa/flash attention return no weights"
        )
    layer_map = resolve_layer_map(layer_map, len(student_attn), len(teacher_attn))
    mask = _token_mask(attention_mask, student_attn[0][:, 0])
    losses = []
    for i, j in enumerate(layer_map, start=1):
        s = student_attn[i - 1].float()
        t = teacher_attn[j - 1].detach().float()
        if s.shape[1] != t.shape[1]:
            _say_heads_averaged(i, s.shape[1], j, t.shape[1])
            s, t = s.mean(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)
        if s.shape != t.shape:
            raise ValueError(
                f"student attention layer {i} {tuple(s.shape)} vs teacher layer {j} {tuple(t.shape)}: "
                f"batch/sequence shapes differ"
            )
        # KL per row; p_t = 0 entries (masked keys) contribute exactly 0.
        kl = (t * (t.clamp_min(_EPS).log() - s.clamp_min(_EPS).log())).sum(dim=-1)  # [B, H, T]
        losses.append(_masked_mean(kl.mean(dim=1), mask))
    return torch.stack(losses).mean()


_HEADS_SAID: set[tuple[int, int, int, int]] = set()


def say_again() -> None:
    """Forget what was said (a new stage or run of a multirun says it again)."""
    _HEADS_SAID.clear()


def _say_heads_averaged(i: int, student_heads: int, j: int, teacher_heads: int) -> None:
    """Once per layer pair and head counts: the maps compared are head averages, not head by head.

    After a structured shrink the student's kept heads are a subset of the teacher's (for a student copied
    from it), but which ones is not recorded, so each kept head is pulled toward the teacher's mean map."""
    key = (i, student_heads, j, teacher_heads)
    if key not in _HEADS_SAID:
        _HEADS_SAID.add(key)
        log.warning(
            "attention transfer: student layer %d has %d heads, teacher layer %d has %d (a head shrink?): "
            "the head-averaged maps are compared, which pulls every student head toward the teacher's mean",
            i,
            student_heads,
            j,
            teacher_heads,
        )


# ---------------------------------------------------------------------------------------------
# Relations and multiple teachers


def _cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x.float(), dim=-1, eps=1e-8)
    return x @ x.transpose(0, 1)


def relation_loss(student_repr: torch.Tensor, teacher_repr: torch.Tensor) -> torch.Tensor:
    """RKD: MSE between the B x B pairwise cosine-similarity matrices of [B, d_s] and [B, d_t] representations.

    Widths may differ. With B = 1 the matrices are both [[1]] and the loss is 0.
    """
    if student_repr.dim() != 2 or teacher_repr.dim() != 2:
        raise ValueError(
            f"representations must be [B, d]; got {tuple(student_repr.shape)} and {tuple(teacher_repr.shape)}"
        )
    if student_repr.shape[0] != teacher_repr.shape[0]:
        raise ValueError(
            f"batch sizes differ: student {student_repr.shape[0]} vs teacher {teacher_repr.shape[0]}"
        )
    return F.mse_loss(_cosine_matrix(student_repr), _cosine_matrix(teacher_repr.detach()))


def combine_teachers(
    teacher_logits: Sequence[torch.Tensor], weights: Sequence[float] | None, temperature: float
) -> torch.Tensor:
    """Weighted average of the teachers' ``softmax(logits / T)``, as log-probabilities [B, C].

    ``weights`` are normalised (None = equal). Use with
    ``F.kl_div(F.log_softmax(s / T, -1), logp, log_target=True, reduction="batchmean")``.
    """
    if len(teacher_logits) == 0:
        raise ValueError("teacher_logits is empty: need at least one teacher")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    shape = tuple(teacher_logits[0].shape)
    for k, logits in enumerate(teacher_logits):
        if logits.dim() != 2 or tuple(logits.shape) != shape:
            raise ValueError(
                f"teacher_logits[{k}] has shape {tuple(logits.shape)}; all must be the same [B, C] "
                f"(teacher 0: {shape})"
            )
    n = len(teacher_logits)
    if weights is None:
        weights = [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"weights={weights}: {len(weights)} weights for {n} teachers")
    if any(not (w >= 0.0 and w != float("inf")) for w in weights):
        raise ValueError(f"weights={weights}: must be finite and >= 0")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"weights={weights}: must not all be zero")
    logp = torch.stack([F.log_softmax(x.detach().float() / temperature, dim=-1) for x in teacher_logits])
    log_w = torch.tensor(
        [w / total for w in weights], device=logp.device
    ).log()  # log 0 = -inf drops a teacher
    return torch.logsumexp(logp + log_w.view(n, 1, 1), dim=0)


# ---------------------------------------------------------------------------------------------
# Config and the combined loss


@dataclass(frozen=True)
class FeatureKDConfig:
    """Weights of the feature-level KD terms (0 = off), added to the logit KD loss by the caller."""

    hidden: float = 0.0
    hidden_kind: str = "mse"
    layer_map: list[int] | None = None
    attention: float = 0.0
    relation: float = 0.0

    def __post_init__(self):
        for name in ("hidden", "attention", "relation"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0.0 <= value < float("inf")
            ):
                raise ValueError(f"{name}={value!r}: weight must be a finite number >= 0")
        if self.hidden_kind not in HIDDEN_KINDS:
            raise ValueError(f"hidden_kind={self.hidden_kind!r}: must be one of {HIDDEN_KINDS}")
        if self.layer_map is not None:
            if isinstance(self.layer_map, (str, bytes)) or not isinstance(self.layer_map, Iterable):
                raise ValueError(
                    f"layer_map={self.layer_map!r}: must be a list of 1-based teacher layers, one per student layer"
                )
            layer_map = list(self.layer_map)  # e.g. an OmegaConf ListConfig from Hydra
            for j in layer_map:
                if isinstance(j, bool) or not isinstance(j, int) or j < 1:
                    raise ValueError(
                        f"layer_map={layer_map}: entry {j!r} must be a 1-based teacher layer (int >= 1)"
                    )
            object.__setattr__(self, "layer_map", layer_map)

    @property
    def needs_hidden(self) -> bool:
        """The models must be called with ``output_hidden_states=True`` (hidden or relation term)."""
        return self.hidden > 0 or self.relation > 0

    @property
    def needs_attentions(self) -> bool:
        """The models must be called with ``output_attentions=True`` and eager attention."""
        return self.attention > 0

    @property
    def active(self) -> bool:
        return self.hidden > 0 or self.attention > 0 or self.relation > 0


def _any_tensor(out: Any) -> torch.Tensor | None:
    for name in ("logits", "last_hidden_state"):
        x = getattr(out, name, None)
        if isinstance(x, torch.Tensor):
            return x
    hs = getattr(out, "hidden_states", None)
    return hs[-1] if hs else None


def feature_kd_loss(
    cfg: FeatureKDConfig,
    student_out: Any,
    teacher_out: Any,
    attention_mask: torch.Tensor | None,
    projection: HiddenProjection | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the active feature KD terms, and the detached parts (keys "hidden", "attention", "relation").

    ``student_out`` / ``teacher_out`` are HF outputs with ``.hidden_states`` / ``.attentions``.
    The relation term uses the last layer's token-0 ([CLS]) hidden state, unprojected.
    Returns a zero loss and no parts when no term is active.
    """
    parts: dict[str, torch.Tensor] = {}
    terms: list[torch.Tensor] = []
    if cfg.needs_hidden:
        for who, out in (("student", student_out), ("teacher", teacher_out)):
            if not getattr(out, "hidden_states", None):
                raise ValueError(
                    f"{who} output has no hidden_states: call the model with output_hidden_states=True"
                )
    if cfg.needs_attentions:
        for who, out in (("student", student_out), ("teacher", teacher_out)):
            if not getattr(out, "attentions", None):
                raise ValueError(
                    f"{who} output has no attentions: call the model with output_attentions=True and "
                    f"eager attention (attn_implementation='eager' or "
                    f"model.set_attn_implementation('eager')); sdpa/flash return none"
                )
    if cfg.hidden > 0:
        h = hidden_state_loss(
            student_out.hidden_states,
            teacher_out.hidden_states,
            cfg.layer_map,
            kind=cfg.hidden_kind,
            projection=projection,
            attention_mask=attention_mask,
        )
        parts["hidden"] = h.detach()
        terms.append(cfg.hidden * h)
    if cfg.attention > 0:
        a = attention_loss(
            student_out.attentions, teacher_out.attentions, cfg.layer_map, attention_mask=attention_mask
        )
        parts["attention"] = a.detach()
        terms.append(cfg.attention * a)
    if cfg.relation > 0:
        r = relation_loss(student_out.hidden_states[-1][:, 0], teacher_out.hidden_states[-1][:, 0])
        parts["relation"] = r.detach()
        terms.append(cfg.relation * r)
    if not terms:
        ref = _any_tensor(student_out)
        return torch.zeros((), device=ref.device if ref is not None else None), parts
    return torch.stack(terms).sum(), parts
