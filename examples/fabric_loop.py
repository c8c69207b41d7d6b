"""Knowledge distillation in a Lightning Fabric loop: ``python examples/fabric_loop.py [--devices 2]``."""

import argparse

import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill import Distiller, FeatureMap


def train(fabric: Fabric, epochs: int = 3) -> tuple[nn.Module, Distiller]:
    """Distill a teacher MLP into a smaller student with one feature map; return both trained parts."""
    fabric.seed_everything(0)
    teacher = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))  # stands in for a trained teacher
    student = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    x = torch.randn(1024, 32)
    y = teacher(x).argmax(-1)
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))

    # The teacher is frozen and placed by the distiller (device, precision); the projector of the feature map is
    # built from one example batch and is the distiller's only parameter.
    distiller = Distiller(teacher, alpha=0.7, temperature=4.0, feature_maps=[FeatureMap(student="1", teacher="1")])
    distiller.on_train_begin(student, example_inputs=x[:2], fabric=fabric)
    optimizer = torch.optim.Adam([*student.parameters(), *distiller.parameters()], lr=1e-2)
    student, optimizer = fabric.setup(student, optimizer)
    distiller = fabric.setup_module(distiller)  # under DDP, synchronizes the projector's gradients

    for _ in range(epochs):
        for inputs, target in loader:
            distiller.on_step_begin()  # records the student's features during its forward
            loss = distiller(inputs, student(inputs), target)  # call it: goes through the DDP wrapper
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            distiller.on_after_optimizer_step()
        distiller.on_epoch_end()
        fabric.print(f"epoch {distiller.epoch}: " + ", ".join(f"{k} {v:.3f}" for k, v in distiller.last_terms.items()))
    distiller.on_train_end()
    return student, distiller


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto")
    fabric.launch()
    train(fabric)
