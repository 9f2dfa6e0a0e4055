"""Task registration and argument binding, in-process."""

from __future__ import annotations

import pytest

from greentask.errors import BadArguments, UnknownFunction
from greentask.registry import Registry, bad_arguments, progress, progress_sink, task


def add(a, b=2):
    return a + b


def test_register_and_look_up():
    registry = Registry()
    assert registry.add(add) == "add"
    assert registry.add(add, "math.add") == "math.add"
    assert registry.lookup("math.add") is add
    with pytest.raises(UnknownFunction, match=r"no task named 'sub'; this server has \["):
        registry.lookup("sub")


def test_get_follows_every_change_of_the_table():
    # The server binds registry.get once per connection: it must see reloads.
    registry = Registry()
    get = registry.get
    registry.add(add, "add")
    saved = registry.snapshot()
    assert get("add") is add and get("sub") is None
    registry.remove_tasks_of([__name__])
    assert get("add") is None and registry.names() == []
    registry.restore(saved)
    assert get("add") is add


def test_a_name_cannot_be_taken_twice():
    registry = Registry()
    registry.add(add, "x")
    with pytest.raises(ValueError, match="already used"):
        registry.add(lambda: 1, "x")


@pytest.mark.parametrize("args, reason", [
    ({}, "missing a required argument: 'a'"),
    ({"a": 1, "c": 2}, "got an unexpected keyword argument 'c'"),
    ([1, 2, 3], "too many positional arguments"),
])
def test_arguments_that_do_not_fit_say_which(args, reason):
    with pytest.raises(TypeError) as raised:
        add(**args) if isinstance(args, dict) else add(*args)
    bad = bad_arguments(add, args, None, raised.value)
    assert isinstance(bad, BadArguments) and bad.__cause__ is raised.value
    assert reason in bad.message
    assert "the signature is add(a, b=2)" in bad.message
    assert "the signature is math.add(a, b=2)" in bad_arguments(add, args, "math.add",
                                                                raised.value).message


def test_type_error_inside_the_task_is_not_bad_arguments():
    def broken(x):
        return x + "s"
    with pytest.raises(TypeError) as raised:
        broken(1)
    assert bad_arguments(broken, [1], None, raised.value) is None


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
