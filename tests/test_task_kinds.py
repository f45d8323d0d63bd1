"""The task kind's one home: names and aliases, the registry's ``tasks`` column, clear refusals."""
import pytest

from workbench.errors import ConfigError
from workbench.methods.registry import available_methods, check_method_task, methods_for_task
from workbench.task_kinds import TaskKind, check_supported, kind_names, register_kind, task_kind


def test_single_label_and_its_old_spelling_are_one_kind():
    assert task_kind("single-label") is task_kind("single_label")
    assert task_kind("single_label").primary_metric == "accuracy"
    assert "single_label" in kind_names()


def test_unknown_kind_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="unknown task kind 'single_lable'.*Did you mean"):
        task_kind("single_lable")


def test_a_spelling_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="already taken"):
        register_kind(TaskKind("other", "x", "accuracy", ("accuracy",), aliases=("single-label",)))


def test_registry_lists_the_kinds_each_method_supports():
    table = available_methods(details=True)
    assert "tasks" in table.columns
    assert table.loc["zero_shot", "tasks"] == "single_label"
    assert "gda" in methods_for_task("single_label")


def test_unsupported_pair_names_the_method_and_the_supporters():
    with pytest.raises(ConfigError, match=r"method 'x' does not support single_label tasks.*support it: \['a', 'b'\]"):
        check_supported("x", ("other",), "single_label", ["b", "a"])
    check_method_task("gda", "single-label")  # supported: no error
    with pytest.raises(ConfigError, match="unknown method"):
        check_method_task("gdaa", "single_label")
