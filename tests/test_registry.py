"""refseg_models.registry.Registry: the one name -> "module:attribute" table behind methods,
encoders and training samplers (one resolver, one message for an unknown name)."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from refseg_models.build import METHODS, method_class
from refseg_models.encoders import ENCODERS
from refseg_models.errors import ModelError
from refseg_models.registry import Registry


def test_an_unknown_name_is_one_message_listing_the_known_ones() -> None:
    registry = Registry("widget", {"b": "json:dumps", "a": "json:loads"}, error=ConfigError)
    with pytest.raises(ConfigError, match=r"^unknown widget 'c'; available: a, b$"):
        registry.get("c")
    assert registry.get("b").__name__ == "dumps" and registry.names() == ["a", "b"] and "a" in registry
    with pytest.raises(ModelError, match="target must be 'module:attribute'"):
        Registry("widget", {"x": "json.dumps"})


def test_entries_registered_for_a_block_are_gone_after_it() -> None:
    registry = Registry("widget", {"a": "json:loads"})
    with registry.registered("b", "json:dumps"):
        assert registry.get("b").__name__ == "dumps"
        with pytest.raises(ModelError, match="registered already"):
            with registry.registered("a", "json:dumps"):
                pass
    assert "b" not in registry and registry.names() == ["a"]


def test_a_methods_name_is_its_registry_key_written_once() -> None:
    for name in METHODS:
        cls = method_class(name)
        assert cls.name == name and "name" not in vars(cls)  # not repeated in the class
    derived = type("Derived", (method_class("fcp"),), {})
    assert derived.name == "fcp"  # a subclass answers with the registered method it derives from
    with pytest.raises(ModelError, match="is not a registered method"):
        METHODS.name_of(type("Lone", (object,), {}))



def test_the_three_registries_share_the_helper() -> None:
    from pipeline.training.sampler_registry import SAMPLERS, check_sampler, recipe_dataset

    assert all(isinstance(r, Registry) for r in (METHODS, ENCODERS, SAMPLERS))
    assert {r.error for r in (METHODS, ENCODERS)} == {ModelError} and SAMPLERS.error is ConfigError
    with pytest.raises(ConfigError, match=r"^unknown training sampler 'mixed'; available: episodes, segic_mixed$"):
        check_sampler("mixed", "segic")
    with pytest.raises(ConfigError, match="feeds segic only, not vrp_sam"):
        check_sampler("segic_mixed", "vrp_sam")
    assert (recipe_dataset("segic_mixed", "coco20i"), recipe_dataset("episodes", "pascal5i")) == ("mixed", "pascal5i")
