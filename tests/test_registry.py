"""Task registration and argument binding, in-process."""

from __future__ import annotations

import pytest

from greentask.errors import BadArguments, UnknownFunction
from greentask.registry import Registry, call_task, progress, progress_sink, task


def add(a, b=2):
    return a + b


def test_register_and_look_up():
    registry = Registry()
    assert registry.add(add) == "add"
    assert registry.add(add, "math.add") == "math.add"
    assert registry.lookup("math.add") is add
    with pytest.raises(UnknownFunction, match=r"no task named 'sub'; this server has \["):
        registry.lookup("sub")


def test_a_name_cannot_be_taken_twice():
    registry = Registry()
    registry.add(add, "x")
    with pytest.raises(ValueError, match="already used"):
        registry.add(lambda: 1, "x")


def test_call_with_keywords_and_positions():
    assert call_task(add, {"a": 1, "b": 5}) == 6
    assert call_task(add, [1]) == 3


@pytest.mark.parametrize("args, reason", [
    ({}, "missing a required argument: 'a'"),
    ({"a": 1, "c": 2}, "got an unexpected keyword argument 'c'"),
    ([1, 2, 3], "too many positional arguments"),
])
def test_arguments_that_do_not_fit_say_which(args, reason):
    with pytest.raises(BadArguments) as info:
        call_task(add, args)
    assert reason in info.value.message
    assert "the signature is add(a, b=2)" in info.value.message


def test_type_error_inside_the_task_is_not_bad_arguments():
    def broken(x):
        return x + "s"
    with pytest.raises(TypeError):
        call_task(broken, [1])


def test_decorator_forms():
    from greentask.registry import default_registry

    @task
    def plain_task_for_test():
        return 1

    @task(name="named.task.for.test")
    def named():
        return 2

    assert default_registry.lookup("plain_task_for_test") is plain_task_for_test
    assert default_registry.lookup("named.task.for.test") is named


def test_progress_goes_to_the_sink_only_inside_it():
    seen = []
    progress(1)
    with progress_sink(seen.append):
        progress(2)
    progress(3)
    assert seen == [2]
