"""Tiny models of six families and their batches, for the conformance matrix (``tests/test_conformance.py``).

Every Hugging Face model is built from a config with random weights (never ``from_pretrained``, nothing is
downloaded); dropout is off everywhere, so a training-mode forward is deterministic and a test can recompute what the
module computed. Special token ids are set inside the small vocabularies (HF warns otherwise).

Families (``FAMILIES``): ``bert_seq`` (BERT sequence classification), ``bert_tok`` (BERT token classification),
``gpt2`` (causal LM), ``t5`` and ``bart`` (encoder-decoder), ``vit`` (image classification) and ``resnet`` (the
torchvision-style CNN of ``tests/helpers/resnet.py``). Batches hold 4 samples; text batches are right-padded with
different lengths per row.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

from tests.helpers.resnet import ResNet

try:  # transformers is not a dependency of the library: the HF families skip without it
    import transformers

    transformers.logging.set_verbosity_error()  # "Generate config ..." and similar info lines
except ImportError:  # pragma: no cover - depends on the environment
    transformers = None

BATCH = 4
TEXT_LEN = 8  # encoder / causal-LM sequence length
SEQ2SEQ_ENCODER_LEN = 10  # encoder-decoder source length
DECODER_LEN = 6  # encoder-decoder target length (!= the source's on purpose)
INIT = 0.3  # weight init std: large enough that random logits are far from uniform (KD terms well above rounding)
VOCAB = 40
SEQ_CLASSES = 3
TOKEN_CLASSES = 5
IMAGE_CLASSES = 3
RESNET_CLASSES = 5
PAD = 0  # pad id of BERT, GPT-2 and T5 (BART's is 1)
POOL = 16  # samples are the first n of a pool of this many
FIRST_REAL_TOKEN = 3  # real tokens are drawn from [3, VOCAB): never a special id

FAMILIES = ("bert_seq", "bert_tok", "gpt2", "t5", "bart", "vit", "resnet")
HF_FAMILIES = FAMILIES[:-1]
ENCODER_DECODER = ("t5", "bart")


def has_transformers() -> bool:
    """Whether ``transformers`` can be imported here."""
    return transformers is not None


# ---------------------------------------------------------------------------------------------------------- models
def _bert_config(size: str, num_labels: int) -> Any:
    big = size == "teacher"
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32 if big else 16,
        num_hidden_layers=2 if big else 1,
        num_attention_heads=2,
        intermediate_size=64 if big else 32,
        max_position_embeddings=16,
        type_vocab_size=1,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        initializer_range=INIT,
        pad_token_id=PAD,
    )


def bert_seq(size: str = "student", outputs: int | None = None) -> nn.Module:
    """``BertForSequenceClassification``: teacher 2 layers x 32, student 1 layer x 16; 3 classes."""
    return transformers.BertForSequenceClassification(_bert_config(size, outputs or SEQ_CLASSES))


def bert_tok(size: str = "student", outputs: int | None = None) -> nn.Module:
    """``BertForTokenClassification``: teacher 2 layers x 32, student 1 layer x 16; 5 tag classes."""
    return transformers.BertForTokenClassification(_bert_config(size, outputs or TOKEN_CLASSES))


def gpt2(size: str = "student", outputs: int | None = None) -> nn.Module:
    """``GPT2LMHeadModel``: teacher 2 layers x 32, student 1 layer x 16; ``outputs``: the vocabulary size."""
    big = size == "teacher"
    config = transformers.GPT2Config(
        vocab_size=outputs or VOCAB,
        n_positions=16,
        n_embd=32 if big else 16,
        n_layer=2 if big else 1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=INIT,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD,
    )
    return transformers.GPT2LMHeadModel(config)


def t5(size: str = "student", outputs: int | None = None) -> nn.Module:
    """``T5ForConditionalGeneration``: teacher 2+2 layers x 32, student 1+1 layer x 16 (pad 0, eos 1, start 0)."""
    big = size == "teacher"
    config = transformers.T5Config(
        vocab_size=outputs or VOCAB,
        d_model=32 if big else 16,
        d_kv=8,
        d_ff=64 if big else 32,
        num_layers=2 if big else 1,
        num_decoder_layers=2 if big else 1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        pad_token_id=PAD,
        eos_token_id=1,
        decoder_start_token_id=PAD,
    )
    return transformers.T5ForConditionalGeneration(config)


def bart(size: str = "student", outputs: int | None = None) -> nn.Module:
    """``BartForConditionalGeneration``: teacher 2+2 layers x 32, student 1+1 layer x 16 (bos 0, pad 1, eos 2)."""
    big = size == "teacher"
    width, ffn, layers = (32, 64, 2) if big else (16, 32, 1)
    config = transformers.BartConfig(
        vocab_size=outputs or VOCAB,
        d_model=width,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        max_position_embeddings=16,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        init_std=INIT,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )
    return transformers.BartForConditionalGeneration(config)


def vit(size: str = "student", outputs: int | None = None) -> nn.Module:
    """``ViTForImageClassification`` on 3x8x8 images, patch 4 (5 tokens): teacher 2 layers x 32, student 1 x 16."""
    big = size == "teacher"
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=32 if big else 16,
        num_hidden_layers=2 if big else 1,
        num_attention_heads=2,
        intermediate_size=64 if big else 32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=INIT,
        num_labels=outputs or IMAGE_CLASSES,
    )
    return transformers.ViTForImageClassification(config)


def resnet(size: str = "student", outputs: int | None = None) -> nn.Module:
    """The torchvision-style ``ResNet``: teacher widths (8, 16), student (4, 8); 5 classes."""
    return ResNet(widths=(8, 16) if size == "teacher" else (4, 8), num_classes=outputs or RESNET_CLASSES)


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "bert_seq": bert_seq,
    "bert_tok": bert_tok,
    "gpt2": gpt2,
    "t5": t5,
    "bart": bart,
    "vit": vit,
    "resnet": resnet,
}


def make_model(family: str, size: str = "student", seed: int = 0, outputs: int | None = None) -> nn.Module:
    """A tiny ``size`` ("student" or "teacher") model of ``family``, its random weights seeded by ``seed``.

    ``outputs`` replaces the size of the logits' last dimension (classes, or the vocabulary of a language model).
    """
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _FACTORIES[family](size, outputs)


def pair(family: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """``(student, teacher)`` of ``family`` with seeded random weights."""
    return make_model(family, "student", seed), make_model(family, "teacher", seed + 1000)


# --------------------------------------------------------------------------------------------------------- batches
def _lengths(n: int, length: int, generator: torch.Generator, shortest: int = 2) -> Tensor:
    """``n`` different-ish lengths in ``[shortest, length]``, the first always ``length`` (a full row)."""
    lengths = torch.randint(shortest, length + 1, (n,), generator=generator)
    lengths[0] = length
    return lengths


def _padded_ids(lengths: Tensor, length: int, generator: torch.Generator, pad: int) -> tuple[Tensor, Tensor]:
    ids = torch.randint(FIRST_REAL_TOKEN, VOCAB, (len(lengths), length), generator=generator)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, pad), mask.long()


def samples(
    family: str,
    n: int = 2 * BATCH,
    seed: int = 0,
    *,
    encoder_len: int = SEQ2SEQ_ENCODER_LEN,
    decoder_len: int = DECODER_LEN,
    decoder_attention_mask: bool = False,
) -> list[Any]:
    """``n`` samples of ``family`` (dicts, or ``(x, y)`` for the ResNet), collated by the default collate.

    - ``bert_seq``: ``input_ids``, ``attention_mask`` (right padding), ``labels`` one class per sample.
    - ``bert_tok``: the same with ``labels`` per token: ``-100`` at the first token and, for even samples, at the
      padding; odd samples keep (meaningless) valid labels on their padding, which only ``attention_mask`` excludes.
    - ``gpt2``: ``labels`` are the ``input_ids`` with ``-100`` at the padding.
    - ``t5`` / ``bart``: ``input_ids`` and ``attention_mask`` of length ``encoder_len``, ``labels`` of length
      ``decoder_len`` with ``-100`` padding (other lengths than the encoder's), no ``decoder_input_ids``; with
      ``decoder_attention_mask=True`` also a ``decoder_attention_mask`` that is ``labels != -100`` except that the
      last real target of sample 0 is masked out too (so it differs from the labels' own mask).
    - ``vit``: ``pixel_values`` ``(3, 8, 8)`` and a class.
    - ``resnet``: ``(image (3, 8, 8), class)``.
    """
    if n > POOL:
        raise ValueError(f"at most {POOL} samples, got {n}")
    return _pool(family, seed, encoder_len, decoder_len, decoder_attention_mask)[:n]


def _pool(family: str, seed: int, encoder_len: int, decoder_len: int, decoder_attention_mask: bool) -> list[Any]:
    """``POOL`` samples drawn from one seeded stream, so the first k samples do not depend on how many are asked."""
    n = POOL
    g = torch.Generator().manual_seed(seed)
    if family == "resnet":
        x = torch.randn(n, 3, 8, 8, generator=g)
        y = torch.randint(0, RESNET_CLASSES, (n,), generator=g)
        return [(x[i], y[i]) for i in range(n)]
    if family == "vit":
        x = torch.randn(n, 3, 8, 8, generator=g)
        y = torch.randint(0, IMAGE_CLASSES, (n,), generator=g)
        return [{"pixel_values": x[i], "labels": y[i]} for i in range(n)]
    if family in ENCODER_DECODER:
        pad = 1 if family == "bart" else PAD
        ids, mask = _padded_ids(_lengths(n, encoder_len, g), encoder_len, g, pad)
        target_lengths = _lengths(n, decoder_len, g)
        target, target_mask = _padded_ids(target_lengths.flip(0), decoder_len, g, pad)
        labels = target.masked_fill(target_mask == 0, -100)
        out = []
        for i in range(n):
            sample = {"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}
            if decoder_attention_mask:
                dam = (labels[i] != -100).long()
                if i == 0:
                    dam[int(dam.sum()) - 1] = 0
                sample["decoder_attention_mask"] = dam
            out.append(sample)
        return out
    ids, mask = _padded_ids(_lengths(n, TEXT_LEN, g), TEXT_LEN, g, PAD)
    if family == "bert_seq":
        labels = torch.randint(0, SEQ_CLASSES, (n,), generator=g)
    elif family == "bert_tok":
        labels = torch.randint(0, TOKEN_CLASSES, (n, TEXT_LEN), generator=g)
        labels[:, 0] = -100
        even = (torch.arange(n) % 2 == 0)[:, None]
        labels = labels.masked_fill(even & (mask == 0), -100)
    elif family == "gpt2":
        labels = ids.masked_fill(mask == 0, -100)
    else:
        raise ValueError(f"unknown family {family!r}")
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def batches(family: str, n_batches: int = 2, seed: int = 0, **kwargs: Any) -> list[Any]:
    """``n_batches`` collated batches of ``BATCH`` samples (what a ``DataLoader`` of :func:`samples` yields)."""
    items = samples(family, n_batches * BATCH, seed, **kwargs)
    return [default_collate(items[i * BATCH : (i + 1) * BATCH]) for i in range(n_batches)]


def loader(family: str, n_batches: int = 2, seed: int = 0, **kwargs: Any) -> DataLoader:
    """A non-shuffled ``DataLoader`` of ``n_batches`` batches of ``BATCH`` samples."""
    return DataLoader(samples(family, n_batches * BATCH, seed, **kwargs), batch_size=BATCH, shuffle=False)


def inputs_of(batch: Any) -> Any:
    """The model inputs of a batch, written here by hand: everything but ``labels`` (a dict) or ``x`` (a tuple)."""
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "labels"}
    return batch[0]


def target_of(batch: Any) -> Tensor:
    """The target of a batch: ``labels`` (a dict) or ``y`` (a tuple)."""
    return batch["labels"] if isinstance(batch, dict) else batch[1]


def shift_right(labels: Tensor, start: int, pad: int) -> Tensor:
    """Decoder inputs from labels, by hand: ``[start, labels[:-1]]`` with ``-100`` replaced by ``pad``."""
    shifted = torch.full_like(labels, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad)


def decoder_inputs(family: str, labels: Tensor) -> Tensor:
    """The decoder inputs T5 / BART build from ``labels`` (T5: start 0, pad 0; BART: start 2, pad 1)."""
    return shift_right(labels, PAD, PAD) if family == "t5" else shift_right(labels, 2, 1)


def model_inputs(family: str, batch: Any) -> Any:
    """What the student and the teacher should receive from ``batch``: no labels, decoder inputs built by hand."""
    inputs = inputs_of(batch)
    if family in ENCODER_DECODER and "decoder_input_ids" not in inputs:
        inputs = {**inputs, "decoder_input_ids": decoder_inputs(family, target_of(batch))}
    return inputs


def logits_of(model: nn.Module, inputs: Any) -> Tensor:
    """Run ``model`` on ``inputs`` (a dict as keyword arguments) and return its logits."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, Tensor) else out.logits


def vit_block(index: int) -> str:
    """The name of ViT block ``index``: ``vit.layers.<i>`` in transformers 5, ``vit.encoder.layer.<i>`` in 4.x."""
    names = {name for name, _ in make_model("vit").named_modules()}
    return f"vit.layers.{index}" if "vit.layers" in names else f"vit.encoder.layer.{index}"


def tuple_index(model: nn.Module, layer: str, inputs: Any) -> int | None:
    """``0`` when ``layer`` returns a tuple (its hidden states first: T5 blocks, 4.x BERT / GPT-2 layers), else None."""
    kinds: list[bool] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, o: kinds.append(isinstance(o, tuple)))
    try:
        with torch.no_grad():
            logits_of(model, inputs)
    finally:
        handle.remove()
    return 0 if kinds[0] else None
