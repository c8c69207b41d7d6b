"""Conformance matrix, self-distillation: ``SelfDistillModule`` with early exit (f), and the backbones it refuses.
The matrix itself: ``tests/test_conformance.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_distill import SelfDistillModule
from tests.helpers import hf
from tests.helpers.conformance import (
    REL,
    Recorder,
    captured,
    make_trainer,
    masked_mse,
    one_torch_thread,  # noqa: F401  (an autouse fixture)
    params,
)

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

# --------------------------------------------------------------------------------------------- f: self-distillation
# family -> (exits, classifier layer, number of classes)
SELF_DISTILL: dict[str, tuple[list[str], str, int]] = {
    "resnet": (["layer1"], "fc", hf.RESNET_CLASSES),
    "vit": (["vit.layers.0"], "classifier", hf.IMAGE_CLASSES),
}


@pytest.mark.parametrize("family", params(list(SELF_DISTILL)))
def test_self_distillation(family: str) -> None:
    exits, classifier, classes = SELF_DISTILL[family]
    backbone = hf.make_model(family, "teacher", seed=0)
    initial = copy.deepcopy(backbone).train()
    temperature, alpha, feature_weight = 3.0, 0.3, 0.03
    module = SelfDistillModule(
        backbone, exits=exits, num_classes=classes, temperature=temperature, alpha=alpha, feature_weight=feature_weight
    )
    recorder = Recorder()
    trainer = make_trainer([recorder])
    trainer.fit(module, hf.loader(family, 2))

    batch = hf.batches(family, 1)[0]
    inputs, y = hf.inputs_of(batch), hf.target_of(batch)
    deepest_feature: list[Tensor] = []
    handle = initial.get_submodule(classifier).register_forward_pre_hook(
        lambda m, args: deepest_feature.append(args[0].detach().clone())
    )
    with captured(initial, {name: (name, None) for name in exits}) as exit_feats, torch.no_grad():
        deepest = hf.logits_of(initial, inputs).double()
    handle.remove()
    heads = recorder.before[0]["heads"]
    if family == "vit":  # a transformer block's (B, L, D) output is read as tokens, not as L channels
        head, feature = heads[0], exit_feats[exits[0]]
        assert head.tokens and head.project.in_features == feature.shape[-1]
        with torch.no_grad():
            by_hand = head.classifier(torch.relu(head.project(feature.mean(1))))
        torch.testing.assert_close(head(feature)[1], by_hand)
    log_pk = F.log_softmax(deepest / temperature, -1)
    expected = float(F.cross_entropy(deepest, y))
    for head, name in zip(heads, exits, strict=True):
        with torch.no_grad():
            hint, logits = head(exit_feats[name])
        logits = logits.double()
        kl = (log_pk.exp() * (log_pk - F.log_softmax(logits / temperature, -1))).sum(-1).mean()
        ce = F.cross_entropy(logits, y)
        hint_loss = masked_mse(hint, deepest_feature[0], None)
        expected += float(alpha * temperature**2 * kl + (1 - alpha) * ce) + feature_weight * hint_loss
    assert recorder.steps[0]["loss"] == pytest.approx(expected, rel=REL)

    # early exit: threshold 0 stops everyone at exit 0, above 1 nobody; in between, per sample
    module.eval()
    with torch.no_grad(), captured(module.backbone, {n: (n, None) for n in exits}) as now:
        full = hf.logits_of(module.backbone, inputs)
        first = module.heads[0](now[exits[0]])[1]
    preds, where = module.predict_early_exit(inputs, threshold=0.0)
    assert where.tolist() == [0] * len(y) and torch.equal(preds, first.argmax(-1))
    preds, where = module.predict_early_exit(inputs, threshold=1.01)
    assert where.tolist() == [len(exits)] * len(y) and torch.equal(preds, full.argmax(-1))
    confidence = first.softmax(-1).max(-1).values
    threshold = float(confidence.median())
    stops = confidence >= threshold
    assert 0 < int(stops.sum()) < len(y)
    preds, where = module.predict_early_exit(inputs, threshold=threshold)
    assert torch.equal(where, torch.where(stops, 0, len(exits)))
    assert torch.equal(preds, torch.where(stops, first.argmax(-1), full.argmax(-1)))


@pytest.mark.parametrize("family", params(["bert_tok", "gpt2", "t5", "bart"]))
def test_self_distillation_refuses_per_token_and_encoder_decoder_backbones(family: str) -> None:
    backbone = hf.make_model(family, "teacher", seed=0)
    exits = {"bert_tok": "bert.encoder.layer.0", "gpt2": "transformer.h.0"}
    if family in hf.ENCODER_DECODER:
        with pytest.raises(ValueError, match=r"does not support encoder-decoder backbones"):
            SelfDistillModule(backbone, exits=["encoder"], num_classes=hf.VOCAB)
        return
    module = SelfDistillModule(backbone, exits=[exits[family]], num_classes=hf.VOCAB)
    with pytest.raises(ValueError, match=r"one prediction per sample, but the backbone returns logits of shape"):
        module.build_heads(hf.inputs_of(hf.batches(family, 1)[0]))
