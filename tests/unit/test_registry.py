"""Named registries: decorator registration, duplicates, import paths, unknown names."""

from __future__ import annotations

import pytest

from qlora_dist.errors import UserError
from qlora_dist.registry import PluginError, Registry


def test_decorator_registers_and_same_object_twice_is_fine():
    reg: Registry = Registry("things")

    @reg.register("one")
    def one():
        return 1

    assert reg.get("one") is one
    reg.register("one", one)  # the same object again: no error
    assert reg.available() == [("one", "built-in")]


def test_a_different_object_under_a_taken_name_is_an_error():
    reg: Registry = Registry("things")
    reg.register("one", object())
    with pytest.raises(ValueError, match="'one' is already registered"):
        reg.register("one", object())


def test_import_path_names_are_loaded_on_demand():
    reg: Registry = Registry("things")
    assert reg.get("qlora_dist.callbacks:StopOnNonFiniteLoss").__name__ == "StopOnNonFiniteLoss"


def test_an_import_path_that_fails_carries_its_own_traceback():
    reg: Registry = Registry("things")
    with pytest.raises(PluginError, match="failed to load: ModuleNotFoundError") as err:
        reg.get("no_such_module_here:thing")
    assert "--- the plugin's traceback ---" in str(err.value)


def test_unknown_names_list_what_is_available():
    reg: Registry = Registry("things")
    reg.register("alpha", object())
    with pytest.raises(UserError, match="unknown thing 'beta': available are alpha"):
        reg.get("beta")


def test_builtin_formats_and_callbacks_are_registered():
    from qlora_dist.callbacks import CALLBACKS
    from qlora_dist.formats import FORMATS, get_format
    from qlora_dist.strategies import STRATEGIES

    assert get_format("chat").needs_chat_template and get_format("alpaca").columns == ("instruction", "output")
    assert {"alpaca", "chat", "completion", "text"} <= set(FORMATS.names())
    assert {"ddp", "deepspeed"} <= set(STRATEGIES.names()) and "stop_on_nan" in CALLBACKS.names()
