r"""What a model receives from a dict batch, and which positions of its outputs count.

One policy, used by :class:`~lightning_distill.DistillModule` (training, validation, test, predict),
:class:`~lightning_distill.DistillationCallback` (the teacher's inputs) and :class:`~lightning_distill.Distiller`:

**Inputs.** The target (``labels``, see :func:`~lightning_distill._batches.split_batch`) never reaches a model, so no
model computes a loss of its own. An encoder-decoder model (a Hugging Face model whose ``config.is_encoder_decoder``
is true: T5, BART, ...) needs decoder inputs: when the batch has no ``decoder_input_ids`` (nor
``decoder_inputs_embeds``), they are built from the labels by the model's own
``prepare_decoder_input_ids_from_labels`` (what the model does itself when given ``labels``) and given to the student
and the teacher alike.

**Masks by meaning.** A mask says which positions of the *logits* count, by what the positions are:

- sequence-level logits ``(B, C)`` (a classifier's) get no position mask;
- per-token logits ``(B, L, V)`` of an encoder-decoder model are **decoder** positions: they count where
  ``decoder_attention_mask`` is set, or, without one, where the labels are not ``ignore_index``; the encoder's
  ``attention_mask`` never applies to them;
- per-token logits of any other model (a causal LM, a token classifier) are input positions: ``attention_mask``
  applies when its shape is the logits' leading shape, and a mask of another length is an error, not a guess.

Token features ``(B, L, D)`` follow the same rule: a layer inside an encoder-decoder model's decoder
(``model.get_decoder()``) has decoder positions, any other layer input positions; features of other ranks (pooled
``(B, D)``, channel-first CNN maps) get no mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

Side = Literal["encoder", "decoder"]
"""Which positions a token tensor has: the inputs' (``attention_mask``) or an encoder-decoder's decoder's."""

_DECODER_INPUT_KEYS = ("decoder_input_ids", "decoder_inputs_embeds")


def is_encoder_decoder(model: nn.Module | None, inputs: Any = None) -> bool:
    """Whether ``model`` is an encoder-decoder: its Hugging Face ``config.is_encoder_decoder``, or decoder inputs.

    Example::

        >>> is_encoder_decoder(nn.Linear(2, 2)), is_encoder_decoder(None, {"decoder_input_ids": 0})
        (False, True)
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) is True:
        return True
    return isinstance(inputs, Mapping) and any(key in inputs for key in _DECODER_INPUT_KEYS)


def route_inputs(inputs: Any, target: Tensor | None, model: nn.Module | None) -> Any:
    """The inputs a model receives from the inputs part of a batch (see the module docstring).

    Args:
        inputs: The inputs part of the batch (the target already split off).
        target: The batch's target, or ``None``.
        model: The model whose family decides (the student; the teacher receives the same inputs).

    Returns:
        ``inputs`` unchanged, or for an encoder-decoder model without decoder inputs a new mapping with
        ``decoder_input_ids`` built from ``target``.

    Raises:
        ValueError: For an encoder-decoder model without decoder inputs and without labels, or one that cannot build
            decoder inputs from labels.

    Example::

        >>> route_inputs({"input_ids": 1}, None, nn.Linear(2, 2))
        {'input_ids': 1}
    """
    if not isinstance(inputs, Mapping) or not is_encoder_decoder(model):
        return inputs
    if any(key in inputs for key in _DECODER_INPUT_KEYS):
        return inputs
    name = type(model).__name__
    if target is None:
        raise ValueError(
            f"{name} is an encoder-decoder model, so it needs decoder inputs, but the batch has neither "
            "`decoder_input_ids` nor `labels`. HINT: put the target sequence under 'labels' (its decoder inputs are "
            "then built from it) or pass `decoder_input_ids`."
        )
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if not callable(prepare):
        raise ValueError(
            f"{name} is an encoder-decoder model without `prepare_decoder_input_ids_from_labels`, so its decoder "
            "inputs cannot be built from the labels (and passing the labels would make every model compute a loss "
            "of its own). HINT: put `decoder_input_ids` into the batch."
        )
    return {**inputs, "decoder_input_ids": prepare(labels=target)}


@dataclass(frozen=True)
class TokenMasks:
    """The per-token masks of one batch, by the positions they describe (``None``: every position counts).

    Attributes:
        encoder: The input positions: the batch's ``attention_mask`` as bool.
        decoder: An encoder-decoder's decoder positions: ``decoder_attention_mask``, else ``labels != ignore_index``.
        encoder_decoder: Whether the model is an encoder-decoder (its per-token logits are decoder positions).
    """

    encoder: Tensor | None = None
    decoder: Tensor | None = None
    encoder_decoder: bool = False

    def for_side(self, side: Side) -> Tensor | None:
        """The mask of ``side``'s positions."""
        return self.decoder if side == "decoder" else self.encoder


def token_masks(inputs: Any, target: Tensor | None, ignore_index: int, model: nn.Module | None) -> TokenMasks:
    """Read the per-token masks of a batch (see :class:`TokenMasks`).

    Example::

        >>> import torch
        >>> masks = token_masks({"attention_mask": torch.tensor([[1, 0]])}, None, -100, None)
        >>> masks.encoder, masks.decoder
        (tensor([[ True, False]]), None)
    """
    encoder_decoder = is_encoder_decoder(model, inputs)
    encoder = decoder = None
    if isinstance(inputs, Mapping):
        if isinstance(inputs.get("attention_mask"), Tensor):
            encoder = inputs["attention_mask"].bool()
        if encoder_decoder and isinstance(inputs.get("decoder_attention_mask"), Tensor):
            decoder = inputs["decoder_attention_mask"].bool()
    if encoder_decoder and decoder is None and target is not None and not target.is_floating_point():
        decoder = target != ignore_index
    return TokenMasks(encoder, decoder, encoder_decoder)


def logits_mask(masks: TokenMasks, logits: Tensor) -> Tensor | None:
    """The mask of the positions of ``logits`` that count (see the module docstring).

    Raises:
        ValueError: If the mask of the logits' positions has another shape than the logits' leading dimensions.

    Example::

        >>> import torch
        >>> masks = TokenMasks(encoder=torch.ones(4, 6, dtype=torch.bool))
        >>> logits_mask(masks, torch.zeros(4, 3)) is None  # a classifier's (B, C) logits: no position mask
        True
        >>> logits_mask(masks, torch.zeros(4, 6, 10)).shape
        torch.Size([4, 6])
    """
    if logits.ndim < 3:
        return None
    side: Side = "decoder" if masks.encoder_decoder else "encoder"
    mask = masks.for_side(side)
    if mask is not None and tuple(mask.shape) != tuple(logits.shape[:-1]):
        which = "decoder mask" if side == "decoder" else "`attention_mask`"
        raise ValueError(
            f"The batch's {which} has shape {tuple(mask.shape)} but the per-token logits {tuple(logits.shape)} have "
            f"{tuple(logits.shape[:-1])} positions: it does not say which of them count. HINT: for an "
            "encoder-decoder model pass `decoder_attention_mask`; otherwise override `DistillModule.position_mask` "
            "to return the mask of the logits' positions."
        )
    return mask


def feature_mask(masks: TokenMasks, side: Side, feature: Tensor, where: str) -> Tensor | None:
    """The mask of the positions of a token feature ``(B, L, D)`` that count; ``None`` for other ranks.

    Raises:
        ValueError: For a rank-3 feature whose leading shape differs from its side's mask.
    """
    mask = masks.for_side(side)
    if mask is None or feature.ndim != 3:
        return None
    if tuple(feature.shape[:2]) != tuple(mask.shape):
        raise ValueError(
            f"{where}: the feature {tuple(feature.shape)} is read as token features (B, L, D), but the batch's "
            f"{side} mask has shape {tuple(mask.shape)}. HINT: `FeatureMap(..., masked=False)` averages over every "
            "position (e.g. for a channel-first (N, C, L) map)."
        )
    return mask


def layer_side(model: nn.Module, layer: nn.Module) -> Side:
    """``"decoder"`` for a layer inside an encoder-decoder model's decoder (``get_decoder()``), else ``"encoder"``.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> layer_side(net, net[0])
        'encoder'
    """
    if is_encoder_decoder(model):
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        if isinstance(decoder, nn.Module) and any(m is layer for m in decoder.modules()):
            return "decoder"
    return "encoder"
