r"""SelfDistillModule: one network teaches itself through auxiliary exits ("Be Your Own Teacher").

Zhang et al., "Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via Self
Distillation", ICCV 2019: shallow classifiers are attached at several depths; the deepest classifier (the network's
own output) teaches the shallower ones, and every exit also learns from the labels. All are trained together, in
one stage, with no separate teacher; at inference the shallow exits let confident samples stop early.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, cast

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor, nn
from typing_extensions import override

from lightning_distill._batches import call_with_inputs, example_inputs, extract_logits
from lightning_distill._layers import find_layer
from lightning_distill._positions import is_encoder_decoder
from lightning_distill._rng import ResumeRng
from lightning_distill._training import (
    FactoryModule,
    LRSchedulerFactory,
    OptimizerFactory,
    check_optimized,
)
from lightning_distill.features._capture import FeatureCapture, ModifiedInPlaceError
from lightning_distill.interop._inc import inc_self_distill_arguments
from lightning_distill.losses.functional import (
    check_alpha,
    check_temperature,
    check_weight,
    cross_entropy,
    distillation_loss_terms,
    mse_feature_loss,
)
from lightning_distill.losses.functional._common import check_ignore_index
from lightning_distill.self_distill._early_exit import EarlyExitReport, ExitModel, run_early_exit, sweep_thresholds
from lightning_distill.self_distill._exits import exit_capture, learn_copies, plan_exits
from lightning_distill.self_distill._heads import ExitHead

_CHECKPOINT_KEY = "self_distill"


class SelfDistillModule(FactoryModule):
    r"""Train a backbone together with auxiliary exits that learn from its deepest output.

    For shallow exit :math:`i` (logits :math:`z_i`, hint :math:`h_i`) and the backbone's own output :math:`z_K`
    (the deepest exit, whose classifier's input :math:`f_K` is the deepest feature), the loss is

    .. math::

        \mathcal{L} = \sum_{i<K} w_i \Big[ \alpha \, T^2 \, \mathrm{KL}\big(p_K^{(T)} \,\|\, p_i^{(T)}\big)
        + (1 - \alpha)\, \mathrm{CE}(z_i, y) + \lambda \, \overline{(h_i - f_K)^2} \Big] + w_K \, \mathrm{CE}(z_K, y)

    (``kd_weight`` / ``task_weight`` replace :math:`\alpha` / :math:`1 - \alpha` when given)

    with :math:`p^{(T)} = \mathrm{softmax}(z / T)` and the deepest logits and feature **detached** (the deepest exit
    is the teacher; it learns from the labels only). Heads (:class:`~lightning_distill.self_distill.ExitHead`)
    attach to the named layers by forward hooks, with no edit to the backbone; they are sized from one dry forward (on
    ``example_input``, ``example_input_array`` or the datamodule's first batch) before the optimizer is built, so the
    optimizer, the checkpoint and resume all see them.

    Args:
        backbone: The network; its forward returns logits (a tensor, ``.logits`` or ``["logits"]``), classes last.
        exits: Dotted names of the backbone layers after which an exit is attached, shallow to deep, in the order
            the forward runs them. Each layer's output must be a tensor whose first dimension is the batch. A
            Hugging Face backbone's hidden states ``(B, L, D)`` (a ViT block's output) get token heads (mean over
            the tokens); other outputs are channel-first maps ``(B, C, *spatial)`` or vectors.
        num_classes: Number of classes.
        temperature: Softmax temperature :math:`T > 0` of the KD terms.
        alpha: Weight :math:`\alpha \in [0, 1]` of the KD term of each shallow exit; ``1 - alpha`` weights its CE.
        kd_weight: Overrides ``alpha`` as the KD weight of the shallow exits (any value ``>= 0``).
        task_weight: Overrides ``1 - alpha`` as the CE weight of the shallow exits (any value ``>= 0``).
        feature_weight: Weight :math:`\lambda \ge 0` of the L2 hint between each shallow exit and the deepest feature.
        exit_weights: Per-exit weights :math:`w_0 .. w_K` (``len(exits) + 1`` numbers, the last for the backbone's
            own output); default all 1.
        feature_layer: Name of the layer whose **output** is the deepest feature. Default: the input of the layer
            that returns the backbone's logits (its classifier), found in the dry forward.
        example_input: Inputs of one batch; when given, the heads are built at construction. Without it (and
            without ``example_input_array``) they are built in ``setup`` from the first training batch.
        example_input_array: The same, under Lightning's name (also the model summary's input); give one of the two.
        ignore_index: Target value left out of every term and metric.
        optimizer: Factory building the optimizer from the parameters (default Adam, lr 1e-3).
        lr_scheduler: Optional factory building a scheduler (stepped every epoch) from the optimizer.
        sync_dist: Average each training term across processes before logging it (one all-reduce per term and
            step). Off by default: per-step training logs show process 0's batch; validation and test metrics are
            always synchronized.

    Raises:
        TypeError: For a backbone that is not an ``nn.Module`` or a non-factory optimizer / scheduler.
        ValueError: For empty or repeated exits, an exit or feature layer the backbone lacks (closest names are
            listed), a bad weight, ``alpha`` or ``temperature``, an encoder-decoder backbone, or (when the heads are
            built) a backbone whose logits are per token rather than ``(B, C)``.

    Example::

        >>> backbone = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
        >>> model = SelfDistillModule(backbone, exits=["1", "3"], num_classes=10, example_input=torch.randn(2, 40))
        >>> [type(head).__name__ for head in model.heads]
        ['ExitHead', 'ExitHead']
        >>> preds, exit_idx = model.predict_early_exit(torch.randn(5, 40), threshold=0.0)
        >>> exit_idx.tolist()
        [0, 0, 0, 0, 0]
    """

    def __init__(
        self,
        backbone: nn.Module,
        exits: Sequence[str],
        num_classes: int,
        *,
        temperature: float = 3.0,
        alpha: float = 0.3,
        feature_weight: float = 0.03,
        kd_weight: float | None = None,
        task_weight: float | None = None,
        exit_weights: Sequence[float] | None = None,
        feature_layer: str | None = None,
        example_input: Any = None,
        example_input_array: Any = None,
        ignore_index: int = -100,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: LRSchedulerFactory | None = None,
        sync_dist: bool = False,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, sync_dist)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"`backbone` must be a torch.nn.Module, got {type(backbone).__name__}.")
        if isinstance(exits, str) or not exits or len(set(exits)) != len(exits):
            raise ValueError(f"`exits` must be a non-empty list of distinct layer names, got {exits!r}.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an int >= 2, got {num_classes!r}.")
        weights = [1.0] * (len(exits) + 1) if exit_weights is None else list(exit_weights)
        if len(weights) != len(exits) + 1:
            raise ValueError(
                f"`exit_weights` needs one weight per exit plus one for the backbone's output ({len(exits) + 1}), "
                f"got {len(weights)}: {exit_weights!r}."
            )
        if is_encoder_decoder(backbone):
            raise ValueError(
                f"SelfDistillModule does not support encoder-decoder backbones ({type(backbone).__name__}): its exits "
                "give one prediction per sample and it builds no decoder inputs. HINT: distill an encoder-decoder "
                "from a teacher with DistillModule + DistillationCallback."
            )
        self.backbone = backbone
        self.exits = tuple(exits)
        self.num_classes = num_classes
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)
        self.kd_weight = self.alpha if kd_weight is None else check_weight("kd_weight", kd_weight)
        self.task_weight = 1.0 - self.alpha if task_weight is None else check_weight("task_weight", task_weight)
        self.feature_weight = check_weight("feature_weight", feature_weight)
        self.exit_weights = [check_weight(f"exit_weights[{i}]", w) for i, w in enumerate(weights)]
        self.ignore_index = check_ignore_index(ignore_index)
        self.feature_layer = feature_layer
        for name in (*self.exits, *([feature_layer] if feature_layer is not None else [])):
            find_layer(backbone, name, role="backbone")
        self.heads = nn.ModuleList()
        self.hint_key: str | None = None  # key of the deepest feature in the capture, set when the heads are built
        self._capture: FeatureCapture | None = None
        # capture keys whose outputs the backbone changes in place later in its forward, so they are captured as
        # copies; None until learned (from the dry forward of `build_heads`, or a checkpoint)
        self._copied: frozenset[str] | None = None
        self._exit_layers: tuple[nn.Module, dict[str, nn.Module]] | None = None
        self._rng = ResumeRng(type(self).__name__)  # the global RNG states, kept in checkpoints for resume
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters(
                ignore=["backbone", "optimizer", "lr_scheduler", "example_input", "example_input_array"]
            )
        if example_input is not None and example_input_array is not None:
            raise ValueError("Pass `example_input` or `example_input_array` (the same thing), not both.")
        example_input = example_input if example_input is not None else example_input_array
        if example_input is not None:
            self.example_input_array = example_input
            self.build_heads(example_input)

    @classmethod
    def from_inc_config(
        cls,
        backbone: nn.Module,
        num_classes: int,
        layer_mappings: Sequence[Sequence[Sequence[str]]],
        loss_types: Sequence[str],
        loss_weights: Sequence[float],
        temperature: float = 1.0,
        add_origin_loss: bool = True,
        **kwargs: Any,
    ) -> SelfDistillModule:
        """Build the module from Intel Neural Compressor's ``SelfKnowledgeDistillationLossConfig`` arguments.

        Each group of ``layer_mappings`` is a list of ``[shallow, deepest]`` layer pairs with one loss type and
        weight. Here the shallow names are the backbone layers the exits attach to (in forward order, first seen
        first); the deepest name of the ``"L2"`` group is the ``feature_layer``. ``"L2"`` sets ``feature_weight``,
        ``"KL"`` and ``"CE"`` the KD weight of the shallow exits: INC's soft cross-entropy differs from the KL only
        by the deepest exit's entropy (a constant for the shallow exit), so the two weights add up. Shallow exits get
        no hard-label term (as in INC); ``add_origin_loss`` keeps the backbone's own CE. Each group counts **once**
        (INC's ``loss_cal`` adds earlier groups again with every later one). Normalizations are ours: the hint is
        a mean squared error, the KD term carries ``T²``.

        Raises:
            ValueError: For groups and ``loss_types`` / ``loss_weights`` of different lengths, an unknown loss type,
                or several deepest layers in the ``"L2"`` group.

        Example::

            >>> backbone = nn.Sequential(
            ...     nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),  # exits after "1" and "3"
            ...     nn.Linear(32, 16), nn.ReLU(),  # "5": the deepest feature
            ...     nn.Linear(16, 10))  # "6": the classifier
            >>> model = SelfDistillModule.from_inc_config(
            ...     backbone, 10,
            ...     layer_mappings=[[["1", "5"], ["3", "5"]], [["1", "6"], ["3", "6"]]],
            ...     loss_types=["L2", "KL"], loss_weights=[0.5, 0.05], temperature=3.0)
            >>> model.exits, model.feature_layer, model.feature_weight, model.kd_weight, model.task_weight
            (('1', '3'), '5', 0.5, 0.05, 0.0)
        """
        return cls(
            backbone,
            num_classes=num_classes,
            temperature=temperature,
            **kwargs,
            **inc_self_distill_arguments(layer_mappings, loss_types, loss_weights, add_origin_loss),
        )

    # ------------------------------------------------------------------------------------------------------ heads
    def build_heads(self, inputs: Any) -> None:
        """Size and create one exit head per exit from a dry forward of the backbone on ``inputs``; idempotent.

        The forward runs in eval mode without gradient (train/eval modes are restored). It also checks that every
        exit runs once, in the given order, and returns a batch-first tensor, finds the deepest feature, and finds
        the exits (and deepest feature) whose outputs the backbone changes in place afterwards (``ReLU(inplace=True)``
        after a BatchNorm, a residual ``out += identity``): those are captured as copies, so training and validation
        see what the exit layer returned, as :meth:`predict_early_exit` and :meth:`export_exit` do.

        Raises:
            ValueError: If an exit does not run, runs out of order, or returns something else than a batch-first
                tensor, or the deepest feature cannot be found while ``feature_weight > 0``.
        """
        if len(self.heads) == len(self.exits):
            return
        plan = plan_exits(
            self.backbone,
            self.exits,
            _to_device(inputs, self),
            num_classes=self.num_classes,
            feature_layer=self.feature_layer,
            feature_weight=self.feature_weight,
        )
        self.heads, self.hint_key, self._copied = plan.heads, plan.hint_key, plan.copied
        self._capture = None  # rebuilt with the hint key on next use

    def _ensure_capture(self) -> FeatureCapture:
        """The forward hooks on the exits (and the deepest feature), attached to the backbone."""
        if self._capture is None:
            self._capture = exit_capture(self.exits, self.hint_key, self._copied)
        self._capture.attach(self.backbone)
        return self._capture

    # ---------------------------------------------------------------------------------------------------- forward
    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the backbone: its output is the deepest exit's."""
        return self.backbone(*args, **kwargs)

    def exit_outputs(self, inputs: Any) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """Run the backbone once and every head on its exit's feature.

        Each head reads what its exit layer returned, even when the backbone changes that output in place later
        (such exits are captured as copies: learned in :meth:`build_heads`, stored in checkpoints; otherwise from
        one dry forward in eval mode without gradient, on the first call).

        Returns:
            ``(logits, hints, deepest_feature)``: the logits of every exit, shallow to deep, the backbone's own last;
            each shallow head's hint; the deepest feature (``None`` when there is none).

        Raises:
            ModifiedInPlaceError: In training mode, if an exit's output is changed in place only in training-mode
                forwards (its copy mode is then set: the next call is right).
        """
        if len(self.heads) != len(self.exits):
            raise RuntimeError(
                f"{type(self).__name__} has no heads yet. HINT: pass `example_input=` or fit it with a Trainer (the "
                "heads are built in setup), or call `build_heads(inputs)`."
            )
        if self._copied is None:
            self._learn_copies(inputs)
        capture = self._ensure_capture()
        with capture.recording():
            deepest = extract_logits(call_with_inputs(self.backbone, inputs), role="backbone")
        try:
            captured = capture.take()
        except ModifiedInPlaceError as err:
            self._copied = capture.copied
            if any(m.training for m in self.backbone.modules()):  # a second forward would train BatchNorm twice
                raise ModifiedInPlaceError(
                    err.role,
                    err.keys,
                    "these exits are copied from now on, so the next step is right; they were not found modified in "
                    "the eval-mode forward that sizes the heads, so the backbone modifies them only when training. "
                    "Or attach the exits to layers whose outputs are not changed afterwards.",
                ) from None
            with capture.recording():  # eval mode: the forward changes nothing, so it can run again
                deepest = extract_logits(call_with_inputs(self.backbone, inputs), role="backbone")
            captured = capture.take()
        hints, logits = [], []
        for head, name in zip(self.heads, self.exits, strict=True):
            hint, head_logits = head(captured[name])
            hints.append(hint)
            logits.append(head_logits)
        return [*logits, deepest], hints, None if self.hint_key is None else captured[self.hint_key]

    def _learn_copies(self, inputs: Any) -> None:
        """Learn which captured outputs the backbone changes in place (heads restored without that knowledge)."""
        self._copied = learn_copies(self.backbone, self._ensure_capture(), inputs)

    # ------------------------------------------------------------------------------------------------------- loss
    def compute_loss(
        self, exit_logits: Sequence[Tensor], hints: Sequence[Tensor], deepest_feature: Tensor | None, target: Tensor
    ) -> dict[str, Tensor]:
        """Compose the loss (see the class docstring) and return every term.

        Returns:
            ``loss`` and, per exit ``i``, ``exit<i>/loss``, ``exit<i>/task_loss``, ``exit<i>/kd_loss`` and (with a
            hint) ``exit<i>/feature_loss``; the deepest exit has ``exit<K>/task_loss`` only.
        """
        deepest = exit_logits[-1]
        teacher = deepest.detach()
        feature = None if deepest_feature is None else deepest_feature.detach()
        terms: dict[str, Tensor] = {}
        total = cross_entropy(deepest, target, ignore_index=self.ignore_index)
        terms[f"exit{len(self.exits)}/task_loss"] = total
        total = self.exit_weights[-1] * total
        for i, (logits, hint) in enumerate(zip(exit_logits[:-1], hints, strict=True)):
            parts = distillation_loss_terms(
                logits, teacher, target, temperature=self.temperature, ignore_index=self.ignore_index
            )
            loss = self.kd_weight * parts["kd_loss"] + self.task_weight * parts["task_loss"]
            terms[f"exit{i}/task_loss"], terms[f"exit{i}/kd_loss"] = parts["task_loss"], parts["kd_loss"]
            if feature is not None and self.feature_weight > 0:
                terms[f"exit{i}/feature_loss"] = mse_feature_loss(hint, feature)
                loss = loss + self.feature_weight * terms[f"exit{i}/feature_loss"]
            terms[f"exit{i}/loss"] = loss
            total = total + self.exit_weights[i] * loss
        terms["loss"] = total
        return terms

    # ------------------------------------------------------------------------------------------------------ steps
    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, target = self.split_batch(batch)
        if target is None:
            raise ValueError("Self-distillation needs labels: every exit learns from them, but the batch has none.")
        logits, hints, feature = self.exit_outputs(inputs)
        terms = self.compute_loss(logits, hints, feature, target)
        self.log_train_terms(terms, batch_size=logits[-1].shape[0])
        return terms["loss"]

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Return the backbone's (deepest exit's) logits."""
        return extract_logits(call_with_inputs(self.backbone, self.split_batch(batch)[0]), role="backbone")

    @override
    def _evaluate(self, stage: str, batch: Any, dataloader_idx: int) -> None:
        """Log ``{stage}/loss`` and ``{stage}/acc`` (the backbone), ``{stage}/acc_exit<i>`` and the ensemble."""
        inputs, target = self.split_batch(batch)
        if target is None:
            return
        logits, _, _ = self.exit_outputs(inputs)
        counted = target != self.ignore_index
        loss = cross_entropy(logits[-1], target, ignore_index=self.ignore_index)
        self.log(f"{stage}/loss", loss, batch_size=target.shape[0], sync_dist=True, prog_bar=stage == "val")
        ensemble = torch.stack([z.float().softmax(-1) for z in logits]).mean(0)
        rates = {f"acc_exit{i}": z.argmax(-1) == target for i, z in enumerate(logits)}
        rates.update(acc=logits[-1].argmax(-1) == target, acc_ensemble=ensemble.argmax(-1) == target)
        for name, hits in rates.items():
            self._log_rate(stage, dataloader_idx, name, hits, counted, prog_bar=name == "acc")

    # ------------------------------------------------------------------------------------------------ lifecycle
    @override
    def setup(self, stage: str) -> None:
        """Build the heads (before the optimizer) from ``example_input_array`` or the first training batch.

        The first batch comes from whatever training data ``fit`` gets: a ``DataLoader``, a datamodule or the module's
        ``train_dataloader`` (see :func:`~lightning_distill._batches.example_inputs`).
        """
        if len(self.heads) == len(self.exits):
            return
        inputs = example_inputs(self.trainer, self)
        if inputs is None:
            raise RuntimeError(
                f"{type(self).__name__} sizes its exit heads from one dry forward, but has no example input. HINT: "
                "pass `example_input=` (the inputs of one batch) or `example_input_array=`; inside `Trainer.fit` the "
                "first training batch is used."
            )
        self.build_heads(inputs)
        if self.example_input_array is None:  # kept (two samples) for `export_exit` and the model summary
            self.example_input_array = apply_to_collection(inputs, Tensor, lambda t: t[:2])

    @override
    def teardown(self, stage: str) -> None:
        """Remove the forward hooks from the backbone."""
        if self._capture is not None:
            self._capture.remove()

    @override
    def on_fit_start(self) -> None:
        """Refuse to train if an exit head's parameter is in no optimizer; on resume, restore the RNG states."""
        self._rng.fit_start(self.trainer)
        check_optimized(
            self,
            ((f"heads.{name}", p) for name, p in self.heads.named_parameters()),
            "build the optimizer from `self.parameters()` (it includes `self.heads`); under LightningCLI give it as "
            "the model's `optimizer:` argument.",
        )

    @override
    def on_train_start(self) -> None:
        """Warn when a mid-epoch resume cannot continue the epoch's batches (a loader without a ``state_dict``)."""
        self._rng.train_start(self.trainer)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the heads' shapes, the deepest feature's key and the copied captures, to rebuild a bare module.

        Also the global RNG states, which a fit resumed from the checkpoint restores at its start.
        """
        checkpoint[_CHECKPOINT_KEY] = {
            "heads": [head.spec() for head in self.exit_heads],
            "hint_key": self.hint_key,
            "copied": None if self._copied is None else sorted(self._copied),
        }
        self._rng.save(checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the heads from the stored shapes (``load_from_checkpoint`` of a module built without input)."""
        state = checkpoint.get(_CHECKPOINT_KEY)
        self._rng.load(checkpoint)  # the RNG states, restored in on_fit_start if this fit resumes
        if state is None or len(self.heads) == len(self.exits):
            return
        self.heads = nn.ModuleList(
            ExitHead(
                tuple(spec["in_shape"]),
                spec["width"],
                self.num_classes,
                None if spec["hint_shape"] is None else tuple(spec["hint_shape"]),
                spec.get("tokens", False),
            )
            for spec in state["heads"]
        )
        self.hint_key = state["hint_key"]
        copied = state.get("copied")  # absent from older checkpoints: learned on the first `exit_outputs`
        self._copied = None if copied is None else frozenset(copied)
        self._capture = None

    # ------------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_early_exit(self, inputs: Any, threshold: float) -> tuple[Tensor, Tensor]:
        """Predict each sample at the first exit whose top softmax probability is at least ``threshold``.

        Samples that stop at an exit do **not** run the deeper layers: the batch shrinks at every exit to the samples
        still going (see :func:`~lightning_distill.self_distill.run_early_exit`). ``threshold=0`` stops every sample at
        the first exit; a threshold above 1 runs the full network for all.

        Returns:
            ``(predictions, exit_index)``, both ``(N,)``; exit ``len(exits)`` is the backbone's own output.
        """
        return run_early_exit(self, inputs, threshold)

    def sweep_thresholds(self, dataloader: Any, thresholds: Sequence[float], repeats: int = 3) -> list[EarlyExitReport]:
        """Measure accuracy, exit use and latency of early exit per threshold (see :func:`sweep_thresholds`)."""
        return sweep_thresholds(self, dataloader, thresholds, repeats=repeats)

    def export_exit(self, index: int) -> nn.Module:
        """A standalone model that runs the backbone up to exit ``index`` and returns that exit's logits.

        Layers the backbone would only run after that exit are removed from the copy (see
        :class:`~lightning_distill.self_distill.ExitModel`); ``index == len(exits)`` returns a copy of the backbone.
        """
        return ExitModel.from_module(self, index)

    @property
    def exit_heads(self) -> list[ExitHead]:
        """The exit heads, shallow to deep (empty until built)."""
        return [cast(ExitHead, head) for head in self.heads]

    @property
    def exit_layers(self) -> Mapping[str, nn.Module]:
        """The backbone layers the exits attach to, by name, shallow to deep."""
        cached = self._exit_layers
        if cached is None or cached[0] is not self.backbone:  # looked up once per backbone (early exit is hot)
            cached = self._exit_layers = (
                self.backbone,
                {name: find_layer(self.backbone, name, role="backbone") for name in self.exits},
            )
        return cached[1]


def _to_device(inputs: Any, module: L.LightningModule) -> Any:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(inputs, module.device)
