"""Config validation: every bad value raises ConfigError naming the field."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest

from adalora import AdaLoRAConfig, ConfigError, LoRAConfig, RankAllocator, inject_adapters

OK = dict(init_r=12, target_r=8, target_modules=["query", "value"], tinit=10, tfinal=20, delta_t=5, total_steps=200)


def ada(**kw):
    return AdaLoRAConfig(**{**OK, **kw})


@pytest.mark.parametrize("kw, field", [
    (dict(tinit=100, tfinal=100), "tinit"),
    (dict(tinit=150, tfinal=60), "total_steps"),
    (dict(tinit=0, tfinal=0, total_steps=0), "total_steps"),
    (dict(target_r=13), "target_r"),
    (dict(target_r=0), "target_r"),
    (dict(init_r=0, target_r=0), "init_r"),
    (dict(delta_t=0), "delta_t"),
    (dict(beta1=1.0), "beta1"),
    (dict(beta2=-0.1), "beta2"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(lora_alpha=0), "lora_alpha"),
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules=""), "target_modules"),
    (dict(target_modules=["query", ""]), "target_modules"),
    (dict(score="fisher"), "score"),
    (dict(adapter="lora", score="magnitude"), "score"),
    (dict(adapter="dora"), "adapter"),
    (dict(orth_reg_form="squared"), "orth_reg_form"),
    (dict(orth_reg_weight=-1.0), "orth_reg_weight"),
    (dict(tinit=-1), "tinit"),
    (dict(modules_to_save="classifier"), "modules_to_save"),
    (dict(rank_pattern={"query": -1}), "rank_pattern"),
    (dict(on_bad_scores="ignore"), "on_bad_scores"),
])
def test_invalid_adalora_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field) as exc:
        ada(**kw)
    assert "Fix:" in str(exc.value)
    assert isinstance(exc.value, ValueError)  # callers catching ValueError still work


def test_tinit_tfinal_message_says_why():
    with pytest.raises(ConfigError, match=r"tinit \+ tfinal = 200 must be < total_steps = 200"):
        ada(tinit=150, tfinal=50)
    ada(tinit=150, tfinal=49)  # one step of decrease is enough
    AdaLoRAConfig(**{**OK, "prune": False, "tinit": 150, "tfinal": 50})  # SVD-LoRA has no schedule


@pytest.mark.parametrize("kw, field", [
    (dict(r=0), "r"),
    (dict(r=2.5), "r"),
    (dict(lora_alpha=0), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(target_modules=[]), "target_modules"),
])
def test_invalid_lora_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"LoRAConfig\.{field}="):
        LoRAConfig(**kw)


def _field_cases(cls):
    return [pytest.param(cls, f, id=f"{cls.__name__}.{f.name}") for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls, fld", _field_cases(LoRAConfig) + _field_cases(AdaLoRAConfig))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_value_refused_in_every_field(cls, fld, bad):
    """NaN passes range checks (``nan < 0`` is False) and inf passes ``> 0``: every field refuses both by name."""
    kw = OK if cls is AdaLoRAConfig else {}
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{fld.name}=.*finite.*Fix:"):
        cls(**{**kw, fld.name: bad})


@pytest.mark.parametrize("cls", [LoRAConfig, AdaLoRAConfig])
def test_float_fields_refuse_non_finite_and_accept_finite(cls):
    """The float fields (by annotation): the ones where NaN / inf would otherwise be accepted silently."""
    floats = [f.name for f in dataclasses.fields(cls) if f.type in ("float", float)]
    assert {"lora_alpha", "lora_dropout"} <= set(floats)
    if cls is AdaLoRAConfig:
        assert {"beta1", "beta2", "orth_reg_weight"} <= set(floats)
    kw = OK if cls is AdaLoRAConfig else {}
    for name in floats:
        cls(**{**kw, name: getattr(cls(**kw), name)})  # the default is finite and accepted
    with pytest.raises(ConfigError, match="orth_reg_weight=nan"):  # used to be accepted, and to act as 0
        AdaLoRAConfig(**OK, orth_reg_weight=math.nan)
    with pytest.raises(ConfigError, match="lora_alpha=inf"):  # used to pass "> 0"
        cls(**{**kw, "lora_alpha": math.inf})


def test_valid_configs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = ada()
        lc = LoRAConfig(r=4, target_modules="encoder.*query")
    assert c.r == 12 and lc.init_r == 4
    assert AdaLoRAConfig().score == "ipt" and AdaLoRAConfig().total_steps is None


def test_target_equal_init_warns():
    with pytest.warns(UserWarning, match="nothing to prune"):
        ada(target_r=12)


def test_allocator_needs_total_steps_and_adaloraconfig(make_mlp):
    cfg = AdaLoRAConfig(init_r=4, target_r=2, target_modules=["0", "2"])
    adapters = inject_adapters(make_mlp(), cfg)
    with pytest.raises(ConfigError, match="total_steps"):
        RankAllocator(adapters, cfg)
    with pytest.raises(ConfigError, match="AdaLoRAConfig"):
        RankAllocator(adapters, LoRAConfig(r=4, target_modules=["0", "2"]))
    with pytest.raises(ConfigError, match="adapter='lora'"):  # SVD adapters with a prune-LoRA config
        RankAllocator(adapters, AdaLoRAConfig(init_r=4, target_r=2, target_modules=["0", "2"], total_steps=10,
                                              adapter="lora"))
    with pytest.raises(ConfigError, match="no adapters"):
        RankAllocator({}, AdaLoRAConfig(init_r=4, target_r=2, total_steps=10))
