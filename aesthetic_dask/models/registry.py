"""The registry of the published aesthetic heads: data only (open_clip's ``pretrained.py``).

Each entry names its sources pinned to a revision (and a sha256 where one is published), its
layout, the CLIP embedding space it was trained on, and its license. Fetching them is
:mod:`.fetch`; reading their files is :mod:`.checkpoint`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .heads import LAYOUTS, PredictorSpec


@dataclass(frozen=True)
class HubFile:
    """One file on the Hugging Face hub at a pinned revision."""

    repo_id: str
    filename: str
    revision: str
    sha256: str | None = None

    @property
    def url(self) -> str:
        return f"hf://{self.repo_id}@{self.revision}/{self.filename}"

    def local_copy(self, model_dir: Path) -> Path:
        return model_dir / self.repo_id / self.filename


@dataclass(frozen=True)
class UrlFile:
    """One file at a pinned URL (e.g. a GitHub raw URL at a commit), verified by its sha256."""

    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def local_copy(self, model_dir: Path) -> Path:
        parsed = urlparse(self.url)
        return model_dir / "url" / (parsed.netloc or "local") / parsed.path.lstrip("/")


@dataclass(frozen=True)
class ClipRef:
    """The CLIP embedding space a head was trained on: an open_clip model name and pretrained tag."""

    model: str
    pretrained: str

    def __str__(self) -> str:
        return f"--clip-model {self.model} --clip-pretrained {self.pretrained}"


@dataclass(frozen=True)
class RegisteredWeights:
    name: str
    sources: tuple[HubFile | UrlFile, ...]
    spec: PredictorSpec
    clip: ClipRef
    license: str
    description: str = ""
    # Where its scores land on real images (the improved predictor's and LAION-Aesthetics' 1..10
    # rating scale): a threshold outside keeps everything or nothing, said before the work.
    typical_scores: tuple[float, float] = (1.0, 10.0)


_SAC_LOGOS_AVA1_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
_IMPROVED = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/6934dd81792f086e613a121dbce43082cb8be85e"
_LAION_V1 = "https://github.com/LAION-AI/aesthetic-predictor/raw/6d122adad522ab246644d9dc1c6d7a3810ee255f"
_OPENAI_L14 = ClipRef("ViT-L-14-quickgelu", "openai")


def _v1(dim: int) -> PredictorSpec:
    return dataclasses.replace(LAYOUTS["linear"], dims=(dim, 1))


def _github_head(repo_at_commit: str, name: str, sha256: str, spec: PredictorSpec, clip: ClipRef, license: str,
                 description: str) -> RegisteredWeights:
    """A head published as ``NAME.pth`` in a GitHub repository, pinned to a commit and its sha256."""
    return RegisteredWeights(name=name, sources=(UrlFile(f"{repo_at_commit}/{name}.pth", sha256),), spec=spec, clip=clip,
                             license=license, description=description)


REGISTRY: dict[str, RegisteredWeights] = {
    entry.name: entry
    for entry in (
        RegisteredWeights(
            name="sac+logos+ava1-l14-linearMSE",
            sources=(
                # The revision NeMo Curator pins (short form 1e77fa0).
                HubFile("ttj/sac-logos-ava1-l14-linearMSE", "model.safetensors", "1e77fa05081323d99725fc40a9bf9f88180490e7"),
                HubFile("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth", "main",
                        sha256=_SAC_LOGOS_AVA1_SHA256),
                UrlFile(f"{_IMPROVED}/sac+logos+ava1-l14-linearMSE.pth", _SAC_LOGOS_AVA1_SHA256),
            ),
            spec=LAYOUTS["improved-linear"], clip=_OPENAI_L14, license="Apache-2.0",
            description="improved aesthetic predictor, SAC + LOGOS + AVA1, linear MLP (the default; NeMo Curator's)",
        ),
        _github_head(_IMPROVED, "ava+logos-l14-linearMSE", "390a3aafaf3b37d57148f9b22f30556de38343064b7d915acfa80d3812b4c9ff",
                     LAYOUTS["improved-linear"], _OPENAI_L14, "Apache-2.0", "improved aesthetic predictor, AVA + LOGOS, linear MLP"),
        _github_head(_IMPROVED, "ava+logos-l14-reluMSE", "0af3254c651d55b7ea851429c20f26ec880bb0169805a4df85b814bd7966f3e4",
                     LAYOUTS["improved-relu"], _OPENAI_L14, "Apache-2.0", "improved aesthetic predictor, AVA + LOGOS, ReLU MLP"),
        _github_head(_LAION_V1, "sa_0_4_vit_l_14_linear", "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba",
                     _v1(768), _OPENAI_L14, "MIT", "LAION-Aesthetics V1 (one linear layer), ViT-L/14"),
        _github_head(_LAION_V1, "sa_0_4_vit_b_16_linear", "8ad3923d7ecf019df20ecd2ab5542a3075fbba0278d239c0371345f3d7fcbde0",
                     _v1(512), ClipRef("ViT-B-16", "openai"), "MIT", "LAION-Aesthetics V1 (one linear layer), ViT-B/16"),
        _github_head(_LAION_V1, "sa_0_4_vit_b_32_linear", "c7b14cead230694acc7b9447974d3cad78003c72da032e402a303b6c2429e85f",
                     _v1(512), ClipRef("ViT-B-32-quickgelu", "openai"), "MIT", "LAION-Aesthetics V1 (one linear layer), ViT-B/32"),
    )
}
