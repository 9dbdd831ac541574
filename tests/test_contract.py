"""ONE contract test over every registered backbone: a new plugin file is covered automatically."""
from __future__ import annotations

import pytest

import bench
from bench.check import build_tiny, check_declarations, check_import_is_cheap, check_instance
from bench.registry import get_backbone_class


@pytest.mark.parametrize("name", bench.list_backbones())
def test_backbone_contract(name):
    cls = get_backbone_class(name)
    check_declarations(cls)
    check_import_is_cheap(cls)
    check_instance(build_tiny(cls))


def test_contract_catches_a_lying_feature_info():
    class Liar(bench.Backbone):
        name = "liar"

        @property
        def feature_info(self):
            return [bench.FeatureInfo("a", 3, 1)]

        def preprocess(self, images):
            return images.float()

        def forward_features(self, x):
            return [x[:, :2]]  # 2 channels, not the declared 3

    with pytest.raises(bench.BenchError, match="feature_info implies"):
        check_instance(Liar())
