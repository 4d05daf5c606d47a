import pytest
import torch

from multimodal import FoundationConfig, FoundationModel


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model() -> FoundationModel:
    return FoundationModel(FoundationConfig.from_preset("tiny")).eval()
