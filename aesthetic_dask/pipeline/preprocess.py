"""The model's input as uint8 crops: what the host processes make, and how the device finishes it.

open_clip's eval preprocess is resize, centre crop, RGB, ``ToTensor`` (/255) and ``Normalize``.
The host processes stop before ``ToTensor``: they hand back uint8 crops at the model's resolution
(a quarter of float32's bytes through shared memory and over PCIe), and the model's process
scales and normalises a whole batch at once on its device (:func:`normalize`), with the same
float32 arithmetic as ``ToTensor`` + ``Normalize``.

Both halves are built from open_clip's own ``PreprocessCfg`` (the model's ``preprocess_cfg``),
never restated here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class InputSpec:
    """The model's preprocess settings (open_clip's ``PreprocessCfg`` fields), a plain picklable value."""

    size: tuple[int, int]
    mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    resize_mode: str
    fill_color: int

    @classmethod
    def of(cls, preprocess_cfg: dict[str, Any]) -> InputSpec:
        """From a model's ``visual.preprocess_cfg``, through open_clip's ``PreprocessCfg`` (its defaults)."""
        from open_clip.transform import PreprocessCfg

        cfg = asdict(PreprocessCfg(**preprocess_cfg))
        size = cfg["size"]
        cfg["size"] = (size, size) if isinstance(size, int) else tuple(size)
        cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
        return cls(**cfg)

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        """(3, H, W): one crop's uint8 layout in shared memory and on the device."""
        return (3, *self.size)

    @property
    def tensor_ops(self) -> bool:
        """Whether resize and crop can run as tensor ops exactly as open_clip's transforms do."""
        return (self.mode == "RGB" and self.interpolation in ("bicubic", "bilinear")
                and (self.resize_mode == "squash" or (self.resize_mode == "shortest" and self.size[0] == self.size[1])))

    def pil_transforms(self) -> list[Any]:
        """open_clip's own eval transforms up to (not including) ``ToTensor``: PIL in, PIL out."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        transforms = list(image_transform_v2(PreprocessCfg(**asdict(self)), is_train=False).transforms)
        cut = next(i for i, t in enumerate(transforms) if type(t).__name__.endswith("ToTensor"))
        if [type(t).__name__ for t in transforms[cut + 1:]] != ["Normalize"]:
            raise ValueError(f"open_clip's preprocess ends in {transforms[cut:]}, not ToTensor + Normalize")
        return transforms[:cut]

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float] | None:
        """For ``shortest`` resizing to a square, the region of a ``width`` x ``height`` source that
        open_clip's resize-then-centre-crop keeps, in source pixels (None for other modes), with
        torchvision's arithmetic (``Resize`` truncates the long side, ``CenterCrop`` rounds).
        Pillow's ``resize(size, box=...)`` of that region filters with the pixels around it too,
        so it is the same crop without the whole resized image in memory (a 1x16000 image is
        224x3.6M pixels resized), within rounding: Pillow may order its two passes otherwise
        (at most 2 levels, 0.12 on average, on photos; tests/test_decode.py)."""
        side = self.size[0]
        if self.resize_mode != "shortest" or self.size[0] != self.size[1]:
            return None
        short, long = sorted((width, height))
        resized_long = int(side * long / short)
        offset = int(round((resized_long - side) / 2.0))
        start, end = offset * long / resized_long, (offset + side) * long / resized_long
        return (start, 0.0, end, float(height)) if width >= height else (0.0, start, float(width), end)

    def resize_crop(self, image: Any) -> Any:
        """uint8 (3, H, W) tensor -> uint8 crop of :attr:`crop_shape` (antialiased, as Pillow)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        how = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        if self.resize_mode == "squash":
            return F.resize(image, list(self.size), interpolation=how, antialias=True)
        image = F.resize(image, [self.size[0]], interpolation=how, antialias=True)  # the shorter side
        return F.center_crop(image, list(self.size))


class Normalizer:
    """uint8 (N, 3, H, W) crops on the model's device -> the model's input: ``ToTensor`` and
    ``Normalize``, (x / 255 - mean) / std, for a whole batch, as one multiply-add per element
    (x * (1 / (255 std)) - mean / std, in place: two passes over the batch instead of four; within
    float32 rounding of the two steps). mean and std go to the device once, not per batch."""

    def __init__(self, spec: InputSpec, device: str, dtype: Any) -> None:
        import torch

        mean = torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
        self.scale = (1 / (255 * std)).to(device=device, dtype=torch.float32)
        self.shift = (-mean / std).to(device=device, dtype=torch.float32)
        self.dtype = dtype

    def __call__(self, crops: Any) -> Any:
        return crops.to(torch_float32()).mul_(self.scale).add_(self.shift).to(self.dtype)


def torch_float32() -> Any:
    import torch

    return torch.float32
