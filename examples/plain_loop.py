"""Knowledge distillation in a plain PyTorch loop, with Intel Neural Compressor's hook names."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill import Distiller


def train(epochs: int = 3) -> tuple[nn.Module, Distiller]:
    """Distill a teacher MLP into a smaller student with a task loss of your own; return both."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))  # stands in for a trained teacher
    student = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    x = torch.randn(1024, 32)
    y = teacher(x).argmax(-1)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)

    distiller = Distiller(teacher, alpha=0.7, temperature=4.0)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    distiller.on_train_begin(student)
    for epoch in range(epochs):
        distiller.on_epoch_begin(epoch)
        for inputs, target in loader:
            distiller.on_step_begin()
            output = student(inputs)
            task_loss = nn.functional.cross_entropy(output, target)
            loss = distiller.on_after_compute_loss(inputs, output, task_loss)  # 0.7 * KD + 0.3 * task_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        distiller.on_epoch_end()
        print(f"epoch {distiller.epoch}: " + ", ".join(f"{k} {v:.3f}" for k, v in distiller.last_terms.items()))
    distiller.on_train_end()
    return student, distiller


if __name__ == "__main__":
    train()
