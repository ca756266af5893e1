"""One configuration's folds, loaded once: an image in, probabilities on the preprocessed grid out.

Per call: the training preprocessing (the same function, :func:`preprocess_case`), then the
sliding window with mirror TTA over every fold's tile model into one accumulator. The tile
models are the prediction protocol of :mod:`autoseg.inference.backends` (torch, ONNX Runtime,
OpenVINO), so every backend shares the preprocessing, the window, TTA and the averaging.

A cascade stage (``3d_cascade_fullres``) holds its previous stage's ensemble: that one predicts the case
first, and its mask, put on this stage's preprocessed grid as preprocessing puts labels and one-hot encoded,
joins the image as extra input channels (as in training, :mod:`autoseg.training.cascade`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from autoseg.core.checkpoint import load_weights
from autoseg.core.devices import inference_autocast, resolve_device
from autoseg.core.errors import CheckpointError, WorkspaceError
from autoseg.core.geometry import Geometry
from autoseg.core.plan import Configuration, Plan
from autoseg.data.preprocessing.pipeline import PreprocessingRecord, one_hot, preprocess_case
from autoseg.data.preprocessing.restore import probabilities_on_input_grid, probabilities_to_labels
from autoseg.inference.backends import TileModel, backend_model, onnx_model, resolve_backend
from autoseg.inference.compiled import CompiledNetwork
from autoseg.inference.onnx_export import stored_digest, weights_digest
from autoseg.inference.sliding_window import (
    PassCount,
    WindowSettings,
    as_probabilities,
    as_tensor,
    predict_probabilities,
)
from autoseg.model.network import build_network

DEFAULT_STEP = 0.5
CPU_ACTIVATION_BUDGET = 1024**3
ACTIVATION_BYTES_PER_INPUT_VOXEL_AND_FEATURE = 20  # measured: Task01 network, one 128^3 sample, 1.3 GB
OnTile = Callable[[int, int], None]


def mirror_batch_limit(config: Configuration, device: torch.device) -> int:
    """How many mirrored copies of a tile share one forward pass.

    On CUDA all 8 (an out-of-memory error halves it). On a CPU batching buys little speed
    and a Task01-size copy already needs ~1.3 GB of activations, so the batch is what fits
    in ``CPU_ACTIVATION_BUDGET``, at least 1.
    """
    if device.type == "cuda":
        return 8
    per_copy = (
        ACTIVATION_BYTES_PER_INPUT_VOXEL_AND_FEATURE
        * config.network.features_per_stage[0]
        * math.prod(config.patch_size)
    )
    return int(max(1, min(8, CPU_ACTIVATION_BUDGET // per_copy)))


def mirror_axes_for(
    config: Configuration, tta: bool, axes: Sequence[int] | None, adaptive: float | None
) -> tuple[int, ...]:
    """The patch axes TTA mirrors: none without ``tta``, else ``axes`` (None: the configuration's mirror axes,
    by default every axis of the network).
    Axes the network does not have, and an adaptive threshold that can never or always skip, are refused."""
    default = range(config.dims) if config.mirror_axes is None else config.mirror_axes
    chosen = tuple(default) if axes is None else tuple(axes)
    if not tta:
        chosen = ()
    bad = [a for a in chosen if not 0 <= a < config.dims]
    if bad or len(set(chosen)) != len(chosen):
        raise WorkspaceError(
            f"--mirror-axes {' '.join(map(str, chosen))}: give distinct axes of the "
            f"{config.name} network's {config.dims}D patch ({', '.join(map(str, range(config.dims)))})"
        )
    if adaptive is not None and not 0.5 < adaptive < 1:
        raise WorkspaceError(f"--adaptive-tta {adaptive}: give a confidence between 0.5 and 1 (e.g. 0.9)")
    if adaptive is not None and not chosen:
        raise WorkspaceError("--adaptive-tta needs mirror TTA; drop --no-tta/--fast or the adaptive threshold")
    return tuple(sorted(chosen))


class FoldEnsemble:
    """The folds of one configuration behind one backend.

    ``weights``: one state dict per fold (weights only). ``onnx_files``: per fold the ONNX model
    ``autoseg export`` wrote (``None`` or missing: exported from the weights when the backend needs one).
    ``int8_files``: per fold its accepted INT8 model (``export --int8``), which ``precision="int8"`` needs.
    ``torch_compile``: run the torch backend's networks through torch.compile (:mod:`autoseg.inference.compiled`).
    ``previous_stage``: a cascade stage's previous stage, whose mask the networks read (required for one).
    """

    def __init__(
        self,
        plan: Plan,
        configuration: str,
        weights: Sequence[dict],
        device: str = "auto",
        tta: bool = True,
        step: float = DEFAULT_STEP,
        precision: str = "auto",
        backend: str = "torch",
        onnx_files: Sequence[Path | None] = (),
        int8_files: Sequence[Path | None] = (),
        mirror_axes: Sequence[int] | None = None,
        adaptive_tta: float | None = None,
        torch_compile: bool = False,
        previous_stage: FoldEnsemble | None = None,
    ) -> None:
        if not weights:
            raise CheckpointError("no fold to predict with")
        self.plan = plan
        self.config = plan.configuration(configuration)
        self.previous_stage = _check_stage(self.config, previous_stage)
        self.device = resolve_device(device)
        self.backend = resolve_backend(backend, self.device, precision)
        self.int8 = precision == "int8"
        if torch_compile and self.backend != "torch":
            raise WorkspaceError(
                f"--compile compiles the torch backend's network; --backend {self.backend} has its "
                "own compiler: drop --compile"
            )
        self.torch_compile = torch_compile
        autocast = inference_autocast(self.device, precision)
        #: bf16 for torch's autocast, or for OpenVINO's compiled model (the sliding window then stays fp32)
        self.bf16 = autocast == torch.bfloat16
        self.window = WindowSettings(
            patch=tuple(self.config.patch_size),
            step=step,
            mirror_axes=mirror_axes_for(self.config, tta, mirror_axes, adaptive_tta),
            autocast_dtype=autocast if self.backend == "torch" else None,
            max_batch=mirror_batch_limit(self.config, self.device),
            adaptive=adaptive_tta,
            average_logits=plan.imported_from is not None,
            gaussian="nnunet" if plan.imported_from is not None else "analytic",
        )
        self.tta = bool(self.window.mirror_axes)
        #: network passes run and skipped since loading (the Predictor reports them per case); a previous
        #: stage's count as this stage's
        self.passes = PassCount()
        if self.previous_stage is not None:
            self.previous_stage.passes = self.passes
        self.models: list[TileModel] = [
            self._tile_model(index, state, len(weights), onnx_files, int8_files) for index, state in enumerate(weights)
        ]

    def _tile_model(
        self, index: int, state: dict, count: int, onnx_files: Sequence[Path | None], int8_files: Sequence[Path | None]
    ) -> TileModel:
        name = f"model {index + 1} of {count} ({self.config.name})"
        channels, classes = self.plan.input_channels(self.config), self.plan.num_classes
        if self.int8:
            return backend_model(
                self.backend,
                _int8_model(state, int8_files[index] if index < len(int8_files) else None, name),
                self.device,
            )
        if self.backend != "torch":
            stored = onnx_files[index].read_bytes() if index < len(onnx_files) and onnx_files[index] else None
            return backend_model(
                self.backend, onnx_model(state, self.config, channels, classes, stored, name), self.device, self.bf16
            )
        network = build_network(self.config, channels, classes, deep_supervision=False)
        load_weights(network, state, name)
        # channels-last helps cuDNN's mixed-precision kernels; on CPUs it measured slower (docs/performance.md)
        memory_format = (
            (torch.channels_last_3d if self.config.dims == 3 else torch.channels_last)
            if self.device.type == "cuda"
            else torch.contiguous_format
        )
        network = network.to(self.device, memory_format=memory_format).eval()
        if not self.torch_compile:
            return network
        example = torch.zeros((1, channels, *self.config.patch_size), device=self.device)
        return CompiledNetwork(network, example, self.window.autocast_dtype, name)

    @torch.inference_mode()
    def probabilities(
        self, data: np.ndarray, geometry: Geometry, on_tile: OnTile | None = None
    ) -> tuple[torch.Tensor, PreprocessingRecord]:
        """The mean of every fold's and mirror's softmax (sigmoid for regions) on the preprocessed grid,
        and the record that maps it back. ``data`` may be normalised in place: pass a copy to keep it."""
        image, record = self._network_input(data, geometry, on_tile)
        return predict_probabilities(
            self.models,
            image,
            self.plan.num_classes,
            self.window,
            bool(self.plan.regions),
            self.device,
            on_tile,
            self.passes,
        ), record

    @torch.inference_mode()
    def fold_outputs(
        self, data: np.ndarray, geometry: Geometry, on_tile: OnTile | None = None
    ) -> tuple[list[torch.Tensor], PreprocessingRecord]:
        """Each fold's output on the preprocessed grid, apart (for their disagreement), and the record that maps
        the grid back: the same work as :meth:`probabilities`. An output is what the folds are averaged as:
        logits for an imported model (nnU-Net averages logits), else probabilities; :meth:`as_probabilities`
        turns one fold's, or their mean, into probabilities, the mean into :meth:`probabilities`'s."""
        image, record = self._network_input(data, geometry, on_tile)
        regions = bool(self.plan.regions)
        return [
            predict_probabilities(
                [model],
                image,
                self.plan.num_classes,
                self.window,
                regions,
                self.device,
                on_tile,
                self.passes,
                keep_logits=True,
            )
            for model in self.models
        ], record

    def as_probabilities(self, output: torch.Tensor) -> torch.Tensor:
        """Probabilities of a :meth:`fold_outputs` output (or of their mean)."""
        return as_probabilities(output, self.window, bool(self.plan.regions))

    def _network_input(
        self, data: np.ndarray, geometry: Geometry, on_tile: OnTile | None
    ) -> tuple[torch.Tensor, PreprocessingRecord]:
        """The preprocessed image (with a cascade stage's previous-stage mask, one-hot, after its channels) and
        the record that maps the grid back. ``data`` may be normalised in place."""
        previous = None
        if self.previous_stage is not None:  # on a copy: preprocessing below normalises ``data`` in place
            previous = self.previous_stage.labels(np.array(data, dtype=np.float32), geometry, on_tile)
        pre = preprocess_case(data, geometry, self.plan, self.config)
        image, record = pre.data, pre.record
        del pre  # only ``image`` keeps the preprocessed array alive (the tensor shares its memory)
        if previous is not None:
            mask = record.labels_to_grid(previous, self.config.resampling)
            image = np.concatenate([image, one_hot(mask, self.plan.stage_labels)])
        return as_tensor(image), record

    def labels(self, data: np.ndarray, geometry: Geometry, on_tile: OnTile | None = None) -> np.ndarray:
        """Consecutive labels on the input grid, not post-processed: what a cascade's next stage reads."""
        probabilities, record = self.probabilities(data, geometry, on_tile)
        return probabilities_to_labels(probabilities, record, self.plan, self.config.resampling)

    def probabilities_on_input_grid(
        self, data: np.ndarray, geometry: Geometry, on_tile: OnTile | None = None
    ) -> np.ndarray:
        """float16 ``(K, z, y, x)`` probabilities on the input grid (for averaging across configurations)."""
        probabilities, record = self.probabilities(data, geometry, on_tile)
        return probabilities_on_input_grid(probabilities, record, self.plan, self.config.resampling)


def _check_stage(config: Configuration, previous_stage: FoldEnsemble | None) -> FoldEnsemble | None:
    """A cascade stage needs its previous stage's ensemble, and a first stage has none."""
    expected = config.previous_stage
    given = previous_stage.config.name if previous_stage is not None else None
    if expected != given:
        raise WorkspaceError(
            f"{config.name} is a cascade stage: it predicts from {expected}'s masks, not {given or 'none'}"
            if expected is not None
            else f"{config.name} is no cascade stage; it predicts without {given}"
        )
    return previous_stage


def _int8_model(weights: dict, path: Path | None, name: str) -> bytes:
    """The fold's accepted INT8 model, made from these very weights; there is no quantising on the fly
    (calibration and the Dice check need the training data), so anything else is refused."""
    if path is None or not path.is_file():
        raise WorkspaceError(
            f"{name} has no accepted INT8 model; export one with `autoseg export -o model.zip "
            "--int8` and predict with -m model.zip, or choose --precision fp32 or bf16"
        )
    model = path.read_bytes()
    if stored_digest(model) != weights_digest(weights):
        raise WorkspaceError(f"{path} was not quantised from the weights beside it; export again with --int8")
    return model
